"""Training the pixel-space image DiT (``DiTTransformer2DModel``, 1,024 tokens, 12 classes + CFG
null class) on ``ImageClasses``: its DiT initialisation (``build_image_transformer``) and the run
(``train_image``), saved as a ``PixelDiTPipeline`` folder. Recipe: ``recipes.IMAGE_RECIPE``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler

from .checkpoint import init_linear, load_saved_weights, save_run, zero_init
from .data import ImageClasses, make_generator
from .pixel import IMAGE_MODEL_CONFIG, IMAGE_SCHEDULER_CONFIG, PixelDiTPipeline
from .recipes import DATA_CHUNK, IMAGE_RECIPE, TOY_IMAGE_MODEL, TOY_RECIPE
from .training import (
    EMA,
    Chunks,
    Probe,
    adamw,
    autocast,
    clipped_step,
    lr_at,
    maybe_compiled,
    resolve_device,
    run_info,
    sample_timesteps,
    seeded,
    setup_run,
    sync,
    train_loop,
)

__all__ = ["build_image_transformer", "train_image"]


def build_image_transformer(*, toy: bool = False, seed: int = 0) -> DiTTransformer2DModel:
    """The image DiT with DiT's initialisation (xavier linears, N(0, 0.02) embeddings, adaLN-Zero:
    modulation and output projections zero)."""
    cfg = dict(IMAGE_MODEL_CONFIG, **(TOY_IMAGE_MODEL if toy else {}))

    def make():
        m = DiTTransformer2DModel(**cfg)
        m.apply(init_linear)
        w = m.pos_embed.proj.weight
        torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        torch.nn.init.zeros_(m.pos_embed.proj.bias)
        for block in m.transformer_blocks:
            emb = block.norm1.emb
            torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
            torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
            torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
            zero_init(block.norm1.linear)
        zero_init(m.proj_out_1, m.proj_out_2)
        return m

    return seeded(seed, make)


def train_image(
    out_dir: str | os.PathLike,
    *,
    minutes: float = 15.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    toy: bool = False,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    prediction_type: str | None = None,
    init_from: str | os.PathLike | None = None,
    probe_every: float | None = None,
    probe_classifier: str | os.PathLike | None = None,
    probe_samples: int = 48,
    compile: bool | None = None,
    progress: bool = True,
) -> dict:
    """Train the pixel-space image DiT on ``ImageClasses`` and save a ``PixelDiTPipeline`` folder.

    Args:
        out_dir: folder to write (``model_index.json``, ``transformer/`` fp16 safetensors,
            ``scheduler/``, ``train_info.json``).
        minutes: wall-clock budget for the optimisation (stops early and saves).
        seed: fixes the initialisation, the data stream and the noise stream.
        device: ``"auto"`` (CUDA if available), ``"cuda"``, ``"cpu"``, ...
        toy: tiny model and batch for CPU tests (``steps`` defaults to 3).
        steps: the step count the learning rate decays over; default: fitted to ``minutes``
            from the rate measured after 250 steps (the count is in the returned info; passing
            it back reproduces the run).
        batch_size, lr, prediction_type (``"v_prediction"`` or ``"epsilon"``): override
            ``IMAGE_RECIPE``.
        init_from: a folder this function wrote: continue from its (EMA) weights, with a fresh
            optimiser, warm-up and schedule (recorded as ``init_from`` in the info).
        probe_every, probe_classifier, probe_samples: a learning curve (``curve`` in the info):
            every ``probe_every`` minutes and at the end, ``probe_samples`` samples of the EMA
            weights (20 steps) scored by the classifier folder ``probe_classifier``.
        compile: ``torch.compile`` the transformer for training (``None``: on CUDA; measured 1.59x
            faster on an H100 after a first minute of compiling).
        progress: show a tqdm bar.

    Returns:
        The training info (also in ``out_dir/train_info.json``).
    """
    out_dir, dev = Path(out_dir), resolve_device(device)
    recipe = dict(IMAGE_RECIPE, **(TOY_RECIPE if toy else {}))
    if prediction_type is not None:
        recipe["prediction_type"] = prediction_type
    if recipe["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {recipe['prediction_type']!r}")
    plan, bs, peak, budget = setup_run(recipe, dev, toy=toy, steps=steps, batch_size=batch_size, lr=lr, minutes=minutes)

    model = build_image_transformer(toy=toy, seed=seed)
    init = load_saved_weights(init_from, {"transformer": model})
    model.to(dev).train()
    for block in model.transformer_blocks:  # we drop labels ourselves, consistently across blocks
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    null = model.config.num_embeds_ada_norm
    data = ImageClasses(size=model.config.sample_size)
    v_pred, gamma = recipe["prediction_type"] == "v_prediction", recipe["min_snr_gamma"]
    sched = DDIMScheduler(**dict(IMAGE_SCHEDULER_CONFIG, prediction_type=recipe["prediction_type"]))
    ac = sched.alphas_cumprod.to(dev, torch.float32)
    data_gen = make_generator(seed + 1)
    noise_gen = torch.Generator(device=dev).manual_seed(seed + 2)
    opt = adamw(model.parameters(), peak)
    skipped = torch.zeros((), device=dev)
    ema = EMA(model.parameters(), recipe["ema_decay"])
    batches = Chunks(lambda n: data.sample(n, data_gen, device=dev), bs, DATA_CHUNK)
    fwd = maybe_compiled(model, dev.type == "cuda" if compile is None else compile)
    T = sched.config.num_train_timesteps

    def step_fn(i):
        for group in opt.param_groups:
            group["lr"] = lr_at(i, plan.steps, recipe["warmup"], peak)
        x0, y = batches.next()
        y = y.to(dev)
        drop = torch.rand(bs, generator=noise_gen, device=dev) < recipe["label_dropout"]
        y = torch.where(drop, torch.full_like(y, null), y)
        t = sample_timesteps(bs, T, recipe, noise_gen, dev)
        noise = torch.randn(x0.shape, generator=noise_gen, device=dev)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast(dev):
            pred = fwd(xt, timestep=t, class_labels=y).sample
        snr = a.flatten() / (1 - a.flatten())
        if v_pred:
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
            w = torch.ones_like(snr) if gamma is None else torch.clamp(snr, max=gamma) / (snr + 1)
        else:
            target = noise
            w = torch.ones_like(snr) if gamma is None else torch.clamp(snr, max=gamma) / snr
        loss = (w * ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clipped_step(opt, model.parameters(), skipped)
        ema.update()
        return loss.detach()

    def image_pipe():
        pipe = PixelDiTPipeline(model, DPMSolverMultistepScheduler.from_config(sched.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    probe = Probe(probe_every, probe_classifier, probe_samples, image_pipe, ema, [model], dev)
    done, losses, rate = train_loop("image", plan, budget, progress, step_fn, probe)
    sync(dev)
    info = run_info("image", plan=plan, probe=probe, init=init, done=done, losses=losses, rate=rate,
                     seconds=budget.elapsed(), seed=seed, device=str(dev), batch_size=bs, lr=peak, toy=toy,
                     recipe=recipe, params=sum(p.numel() for p in model.parameters()),
                     skipped_steps=int(skipped.item()))
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.1  # the config's value, as constructed
    return save_run(out_dir, ema, [model], image_pipe, info)
