"""Training the pixel-space video CogVideoX (joint text+video attention, 4,608 video tokens + 16
text tokens) with its tiny T5 text encoder on ``VideoCaptions``: the components and their
adaLN-Zero initialisation (``build_video_components``: depth, width, heads, q/k norm, RoPE) and
the run (``train_video``), saved as a ``PixelCogVideoXPipeline`` folder. Recipe:
``recipes.VIDEO_RECIPE``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from transformers import T5Config, T5EncoderModel

from .checkpoint import check_init_config, init_linear, load_saved_weights, save_run, zero_init
from .data import VideoCaptions, make_generator
from .pixel import (
    VIDEO_MODEL_CONFIG,
    VIDEO_SCHEDULER_CONFIG,
    VIDEO_TEXT_ENCODER_CONFIG,
    PixelCogVideoXPipeline,
    build_caption_tokenizer,
)
from .recipes import DATA_CHUNK, TOY_RECIPE, TOY_TEXT_ENCODER, TOY_VIDEO_MODEL, VIDEO_RECIPE
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
    sdpa_first,
    seeded,
    setup_run,
    sync,
    train_loop,
)

__all__ = ["build_video_components", "train_video"]


def build_video_components(*, toy: bool = False, seed: int = 0, qk_norm_init: float = 1.0,
                           heads: int | None = None, layers: int | None = None, width: int | None = None,
                           rope: bool = False):
    """(tokenizer, text_encoder, transformer) of the video testbed, adaLN-Zero initialised.

    heads: number of attention heads (``None``: the config's); width: the attention width
    ``num_attention_heads * attention_head_dim`` (``None``: the config's); the head dim is
    width / heads. layers: the number of transformer blocks (``None``: the config's). Deeper,
    narrower models at the same weight budget are closer to real DiTs (28-60 layers): e.g. 12
    layers of width 128 hold 0.89x the block weights of 6 of width 192.

    qk_norm_init: initial weight of the q/k LayerNorms (CogVideoX normalises q and k per head, so
    an attention logit is at most sqrt(head_dim) * w_q * w_k: 5.7 at w = 1 and head dim 32, the
    config's until 2026-11-25, 8 at head dim 64; little to concentrate attention among 4,624
    keys). The default 1.0 is diffusers' own initialisation; ``VIDEO_RECIPE`` (what
    ``train_video`` uses) sets 1.5, with which the video model (then 6 heads x 32) learned the
    caption's motion within 5 minutes instead of 10-15.

    rope: 3D rotary position embeddings on q/k instead of the 2b layout's sin-cos table added to
    the input (CogVideoX 5b's layout; HunyuanVideo and Wan2.1 also use 3D RoPE). The pipeline
    computes the rotary tables itself from the transformer config.
    """
    if isinstance(qk_norm_init, bool) or not isinstance(qk_norm_init, (int, float)) \
            or not (math.isfinite(qk_norm_init) and qk_norm_init > 0):
        raise ValueError(f"qk_norm_init must be a positive finite number, got {qk_norm_init!r}")
    cfg = dict(VIDEO_MODEL_CONFIG, **(TOY_VIDEO_MODEL if toy else {}))
    for name, value in (("layers", layers), ("width", width), ("heads", heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if layers is not None:
        cfg["num_layers"] = layers
    if heads is not None or width is not None:
        width = width if width is not None else cfg["num_attention_heads"] * cfg["attention_head_dim"]
        heads = heads if heads is not None else cfg["num_attention_heads"]
        if width % 16:  # CogVideoX's 3D sin-cos position embedding splits the width in even parts
            raise ValueError(f"width must be a multiple of 16, got {width}")
        if width % heads:
            raise ValueError(f"heads must divide the width {width}, got {heads!r}")
        cfg.update(num_attention_heads=heads, attention_head_dim=width // heads)
    if not isinstance(rope, bool):
        raise ValueError(f"rope must be True or False, got {rope!r}")
    if rope:
        if cfg["attention_head_dim"] % 16:  # 3D RoPE splits the head dim 2:3:3 into even parts
            raise ValueError(f"rope: the head dim must be a multiple of 16, got {cfg['attention_head_dim']}")
        cfg["use_rotary_positional_embeddings"] = True
    tokenizer = build_caption_tokenizer(cfg["max_text_seq_length"])
    t5 = dict(VIDEO_TEXT_ENCODER_CONFIG, vocab_size=len(tokenizer), **(TOY_TEXT_ENCODER if toy else {}))
    if cfg["text_embed_dim"] != t5["d_model"]:
        raise ValueError("text_embed_dim must equal the text encoder's d_model")

    def make():
        text_encoder = T5EncoderModel(T5Config(**t5))
        m = CogVideoXTransformer3DModel(**cfg)
        m.apply(init_linear)
        w = m.patch_embed.proj.weight
        torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        torch.nn.init.zeros_(m.patch_embed.proj.bias)
        for block in m.transformer_blocks:
            zero_init(block.norm1.linear, block.norm2.linear)
            for norm in (block.attn1.norm_q, block.attn1.norm_k):
                torch.nn.init.constant_(norm.weight, float(qk_norm_init))
        zero_init(m.norm_out.linear, m.proj_out)
        return text_encoder, m

    text_encoder, transformer = seeded(seed, make)
    return tokenizer, text_encoder, transformer


def train_video(
    out_dir: str | os.PathLike,
    *,
    minutes: float = 18.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    toy: bool = False,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    init_from: str | os.PathLike | None = None,
    probe_every: float | None = None,
    probe_classifier: str | os.PathLike | None = None,
    probe_samples: int = 48,
    compile: bool | None = None,
    progress: bool = True,
    qk_norm_init: float | None = None,
    heads: int | None = None,
    attention_backend: str | None = None,
    layers: int | None = None,
    width: int | None = None,
    rope: bool = False,
) -> dict:
    """Train the pixel-space video CogVideoX (and its T5 text encoder) on ``VideoCaptions`` and
    save a ``PixelCogVideoXPipeline`` folder (``tokenizer/``, ``text_encoder/``, ``transformer/``,
    ``scheduler/``, fp16 safetensors). Arguments as ``train_image`` (recipe: ``VIDEO_RECIPE``);
    ``qk_norm_init`` overrides the recipe's, ``heads`` / ``layers`` / ``width`` / ``rope`` the
    config's head count, depth, attention width and position embedding (see
    ``build_video_components``; with ``rope`` the training calls pass the rotary tables the
    pipeline computes, ``_prepare_rotary_positional_embeddings``); ``attention_backend`` (``"cudnn"``, ``"flash"``,
    ``"efficient"``) is tried first by SDPA during training (``None``: PyTorch's own order).

    The text path is the pipeline's: captions are tokenized to ``max_text_seq_length`` tokens,
    encoded by the T5 encoder without attention mask (as ``CogVideoXPipeline`` does), dropped to
    the empty caption ``""`` for CFG (the pipeline's default negative prompt).
    """
    out_dir, dev = Path(out_dir), resolve_device(device)
    recipe = dict(VIDEO_RECIPE, **(TOY_RECIPE if toy else {}))
    if qk_norm_init is not None:
        recipe["qk_norm_init"] = qk_norm_init
    backend_first = sdpa_first(attention_backend)
    plan, bs, peak, budget = setup_run(recipe, dev, toy=toy, steps=steps, batch_size=batch_size, lr=lr, minutes=minutes)

    tokenizer, text_encoder, model = build_video_components(toy=toy, seed=seed, qk_norm_init=recipe["qk_norm_init"],
                                                            heads=heads, layers=layers, width=width, rope=rope)
    check_init_config(init_from, model.config, ("num_layers", "num_attention_heads", "attention_head_dim",
                                                  "use_rotary_positional_embeddings"))
    init = load_saved_weights(init_from, {"transformer": model, "text_encoder": text_encoder})
    model.to(dev).train()
    text_encoder.to(dev).train()
    cfg = model.config
    data = VideoCaptions(frames=cfg.sample_frames, size=cfg.sample_height)
    sched = CogVideoXDDIMScheduler(**VIDEO_SCHEDULER_CONFIG)
    ac = sched.alphas_cumprod.to(dev, torch.float32)
    data_gen = make_generator(seed + 1)
    noise_gen = torch.Generator(device=dev).manual_seed(seed + 2)
    params = list(model.parameters()) + list(text_encoder.parameters())
    opt = adamw(params, peak)
    skipped = torch.zeros((), device=dev)
    ema = EMA(params, recipe["ema_decay"])
    drop_gen = make_generator(seed + 3)  # caption dropout on the CPU: no device sync per step
    batches = Chunks(lambda n: data.sample(n, data_gen, device=dev)[:2], bs, DATA_CHUNK)
    fwd = maybe_compiled(model, dev.type == "cuda" if compile is None else compile)
    T = sched.config.num_train_timesteps
    L = cfg.max_text_seq_length
    id_cache: dict[str, torch.Tensor] = {}

    def video_pipe():
        pipe = PixelCogVideoXPipeline(tokenizer, text_encoder, model, sched)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # the rotary tables of the training shape, as the pipeline computes them at inference
    rotary = video_pipe()._prepare_rotary_positional_embeddings(
        cfg.sample_height, cfg.sample_width, cfg.sample_frames, dev) if cfg.use_rotary_positional_embeddings else None

    def ids_of(captions):
        missing = [c for c in dict.fromkeys(captions) if c not in id_cache]
        if missing:
            enc = tokenizer(missing, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
            for c, row in zip(missing, enc.input_ids):
                id_cache[c] = row
        return torch.stack([id_cache[c] for c in captions]).to(dev)

    def step_fn(i):
        for group in opt.param_groups:
            group["lr"] = lr_at(i, plan.steps, recipe["warmup"], peak)
        video, captions = batches.next()
        x0 = video.permute(0, 2, 1, 3, 4)  # (B, F, C, H, W): CogVideoX's layout
        drop = (torch.rand(bs, generator=drop_gen) < recipe["caption_dropout"]).tolist()
        ids = ids_of(["" if d else c for c, d in zip(captions, drop)])
        t = sample_timesteps(bs, T, recipe, noise_gen, dev)
        noise = torch.randn(x0.shape, generator=noise_gen, device=dev)
        a = ac[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        with autocast(dev):
            emb = text_encoder(ids)[0]
            pred = fwd(hidden_states=xt, encoder_hidden_states=emb, timestep=t, image_rotary_emb=rotary,
                       return_dict=False)[0]
        loss = F.mse_loss(pred.float(), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clipped_step(opt, params, skipped)
        ema.update()
        return loss.detach()

    probe = Probe(probe_every, probe_classifier, probe_samples, video_pipe, ema, [model, text_encoder], dev)
    with backend_first:
        done, losses, rate = train_loop("video", plan, budget, progress, step_fn, probe)
    sync(dev)
    info = run_info("video", plan=plan, probe=probe, init=init, done=done, losses=losses, rate=rate,
                     seconds=budget.elapsed(), seed=seed, device=str(dev), batch_size=bs, lr=peak, toy=toy,
                     attention_backend=attention_backend, rope=rope,
                     recipe=recipe, params=sum(p.numel() for p in model.parameters()),
                     skipped_steps=int(skipped.item()),
                     text_encoder_params=sum(p.numel() for p in text_encoder.parameters()))
    return save_run(out_dir, ema, [model, text_encoder], video_pipe, info)
