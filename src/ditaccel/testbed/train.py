"""Training of the testbed models on procedural data (``ditaccel.testbed.data``).

Three entry points, each with a wall-clock budget (stop at the budget, save what is there):

* ``train_image(out_dir, ...)``: the pixel-space image DiT (``DiTTransformer2DModel``, 1,024 tokens,
  12 classes + CFG null class), saved as a ``PixelDiTPipeline`` folder.
* ``train_video(out_dir, ...)``: the pixel-space video CogVideoX (joint text+video attention,
  4,608 video tokens + 16 text tokens) with its tiny T5 text encoder, saved as a
  ``PixelCogVideoXPipeline`` folder.
* ``train_classifiers(out_dir, ...)``: the image and video classifiers (accuracy and Fréchet
  features for ``ditaccel.evaluate``), saved to ``out_dir/image_classifier`` and
  ``out_dir/video_classifier``.

Recipe (both generators): AdamW (betas 0.9/0.99, no weight decay), linear warm-up then cosine
decay to 10% of the peak learning rate over ``steps`` (given, or fitted to the time budget from
the measured step rate: ``_Plan``), gradient clipping at 1, EMA of the weights (decay 0.999 with
the usual ``(1 + n) / (10 + n)`` warm-up; the EMA weights are the ones saved), bf16 autocast on
CUDA (fp32 master weights), adaLN-Zero initialisation (modulation and output projections zero,
as in the DiT paper), training timesteps half uniform and half logit-normal around 0.38 T
(image) or 0.5 T (video) (``_timesteps``), 10% condition dropout for classifier-free
guidance (the null class / the empty caption, which is what the pipelines feed as the
unconditional input); the video model's q/k LayerNorm weights start at 1.5 (``qk_norm_init``).

* Image: v-prediction (``prediction_type="epsilon"``, the DiT paper's target, is selectable) on
  the released DiT schedule, plain MSE on v (``min_snr_gamma`` sets min-SNR-γ weighting). In
  pixel space an epsilon prediction must be divided by sqrt(ᾱ) ≈ 0.006 at the noisiest step to
  give the image, so its errors there set wrong global colours (seen in a 3-minute H100 trial of
  epsilon + min-SNR-5); a v prediction is the image there.
* Video: v-prediction on the released CogVideoX-2b schedule (zero terminal SNR, SNR shift 3),
  plain MSE on v (= CogVideoX's x0 loss weighted by 1/(1-ᾱ)).

Weights are saved in fp16 safetensors (``save_pretrained``) and read back with diffusers'
``from_pretrained`` (``ditaccel.testbed.pixel.load_image_pipeline`` etc.). Each folder also gets
``train_info.json`` (steps done, time, losses, config, seed).

Determinism: the model initialisation, the data stream and the noise stream each come from their
own seeded generator, so a run with a given step count is a fixed function of ``seed`` (up to
the non-determinism of GPU kernels); without one, the fitted schedule also depends on the speed.

``toy=True`` shrinks everything (16x16 px, a couple of tiny layers, batch 4) for CPU tests.
Command line: ``ditaccel testbed train image|video|classifiers [--out DIR] [--minutes M] [--seed S]
[--steps N] [--device D] [--toy]`` (``scripts/train_testbed.sh`` is how the shipped weights were made).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
)
from tqdm.auto import tqdm
from transformers import T5Config, T5EncoderModel

from ..cli_support import POSITIVE, SEED, UsageError, float_in, progress_on, subcommand, subcommands, tool_main
from ..cli_support import _device as _check_device
from ..evaluate import evaluate
from .classifier import ImageClassifier, VideoClassifier
from .data import ImageClasses, VideoCaptions, make_generator
from .pixel import (
    IMAGE_MODEL_CONFIG,
    IMAGE_SCHEDULER_CONFIG,
    VIDEO_MODEL_CONFIG,
    VIDEO_SCHEDULER_CONFIG,
    VIDEO_TEXT_ENCODER_CONFIG,
    WEIGHTS_DIR,
    PixelCogVideoXPipeline,
    PixelDiTPipeline,
    build_caption_tokenizer,
)

__all__ = [
    "IMAGE_RECIPE",
    "VIDEO_RECIPE",
    "CLASSIFIER_RECIPE",
    "build_image_transformer",
    "build_video_components",
    "weights_bytes",
    "train_classifiers",
    "train_image",
    "train_video",
]

# Measured on one H100 (torch 2.11, bf16, 2026-11-24/25):
# * speed, alone on the GPU: the image DiT at batch 128 ran 15.5 steps/s eager and 24.7 under
#   torch.compile (hence compile on CUDA by default), and 32-33 once its batches were rendered in
#   chunks without device syncs (``DATA_CHUNK``, CPU class indices) with a fused AdamW; sharing the
#   GPU with the video run, 16.1 (image) and 5.3-5.9 (video at 8x48x48, batch 32) steps/s. The
#   classifiers train in 30-40 s each and reach 100% on fresh procedural data.
# * first trained set (16x64x64 video at patch 4, lr 3e-4, uniform t): epsilon + min-SNR-5 gave
#   wrong global colours (classifier accuracy 3%); v-prediction after ~10.5k image steps scored
#   43-50% and the video 3-6% (object and motion).
# * shipped set (this recipe; dense samples, 96 seeds, float32, 20 steps): the image DiT scored
#   84.4% after 15.8k steps in 17 min sharing the GPU and 92.7% after 4.7k more alone (2.5 min,
#   ``--init``). An image run at lr 5e-4 alone reached 97.9% on its 48-sample probe after 14k
#   steps (8 min), then went to NaN. Video (object / motion / colour / background): 52/40/100/85%
#   after 5.1k steps in 17 min sharing the GPU (t centred at 0.38 T, objects of radius 0.2-0.3);
#   alone for 19 min (12.3k steps, 11.8 steps/s) with t centred at 0.5 T, 42/65/100/100%; the
#   next, with objects of radius 0.30-0.42, 56/100/100/80% (12.5k steps, 19 min alone): shapes
#   came out soft. With ``qk_norm_init=1.5`` as well, 71/100/98/99% (12.4k steps; at 5 minutes
#   motion was already 100%, against 23% without); with objects of radius 0.36-0.46 as well (the
#   12.5k steps, 19 min alone), 79/100/100/94% on 96 samples and 76/100/100/94% on 384 (FD 11.5;
#   20.5 for the 0.30-0.42 run). Squares were the shapes it missed (45% recognised, the rest read
#   as circles over stripes and checkerboards; circles 100%, triangles 82%, crosses 77%). The
#   shipped one: squares of half-side 0.9 r (was 0.82 r) and 3 heads x 64 (was 6 x 32, same
#   width; 16.6 compiled steps/s against 11.3): 18.2k steps in 19 min alone, 98.2/100/99.5/99.7%
#   on 384 samples (FD 2.2); its probes read object 65/83/94/98% at 5/10/15/19 min.
# ``info["steps_per_s"]`` reports the rate of a run, ``info["curve"]`` its learning curve.
# Recipe changes for the shipped set: peak lr 3e-4 -> 5e-4 for the video model (a 4.6 M-parameter
# model, ~10-30k steps: the DiT paper's 1e-4 is for 100x the parameters and the steps) and 4e-4
# for the image DiT (no q/k norm: at 5e-4 its loss went to NaN after 22k steps, having scored 98%
# at 14k); half the training timesteps drawn logit-normal around t = 0.38 T (``t_logit_frac`` /
# ``t_logit_mean``; the other half stay uniform): uniform t spends 40% of a batch at SNR < 0.03,
# where the loss is nearly irreducible; EDM and SD3 centre theirs at SNR ~1-10.
# The video model centres its logit-normal half at t = 0.5 T (SNR 0.1 under the CogVideoX schedule)
# instead: an object of ~100 pixels is located, and so its path (the caption's motion) decided, at
# per-pixel SNR ~0.01-0.3, and the first video run (centred at 0.38 T) drew the same path for
# every motion word (scripts/probe_video_caption.py) while it had learned colour and background.
IMAGE_RECIPE = dict(steps=16000, batch_size=128, lr=4e-4, warmup=500, label_dropout=0.1, min_snr_gamma=None,
                    ema_decay=0.999, prediction_type="v_prediction", t_logit_frac=0.5, t_logit_mean=-0.5)
VIDEO_RECIPE = dict(steps=8000, batch_size=32, lr=5e-4, warmup=500, caption_dropout=0.1, ema_decay=0.999,
                    t_logit_frac=0.5, t_logit_mean=0.0, qk_norm_init=1.5)
# Procedural batches are rendered DATA_CHUNK training batches at a time (one vectorised render
# instead of many small ones).
DATA_CHUNK = 16
CLASSIFIER_RECIPE = dict(image_steps=1500, image_batch_size=256, video_steps=1500, video_batch_size=48, lr=2e-3,
                         eval_samples=1024)

# Toy sizes for CPU tests: same architectures, tiny.
TOY_IMAGE_MODEL = dict(sample_size=16, num_layers=2, num_attention_heads=2, attention_head_dim=8)
TOY_VIDEO_MODEL = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, sample_width=16, sample_height=16,
                       sample_frames=4, patch_size=2, text_embed_dim=16, time_embed_dim=16)
TOY_TEXT_ENCODER = dict(d_model=16, d_kv=4, d_ff=32, num_heads=4, num_layers=1)
TOY_RECIPE = dict(steps=3, batch_size=4, warmup=1)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _seeded(seed: int, make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _timesteps(n: int, T: int, recipe: dict, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    """Training timesteps in [0, T): a fraction ``recipe["t_logit_frac"]`` logit-normal (t / T =
    sigmoid(``t_logit_mean`` + N(0, 1))), the rest uniform."""
    uniform = torch.rand(n, generator=gen, device=dev)
    logit = torch.sigmoid(recipe["t_logit_mean"] + torch.randn(n, generator=gen, device=dev))
    pick = torch.rand(n, generator=gen, device=dev) < recipe["t_logit_frac"]
    return (torch.where(pick, logit, uniform) * T).long().clamp(0, T - 1)


class _Chunks:
    """Batches of ``batch_size`` from ``draw(n)`` (a tuple of tensors / lists of length n), drawn
    ``chunk`` batches at a time."""

    def __init__(self, draw, batch_size: int, chunk: int):
        self.draw, self.bs, self.chunk = draw, batch_size, chunk
        self.buf, self.pos = None, 0

    def next(self):
        if self.buf is None or self.pos >= self.chunk:
            self.buf, self.pos = self.draw(self.bs * self.chunk), 0
        a, self.pos = self.pos * self.bs, self.pos + 1
        return tuple(x[a:a + self.bs] for x in self.buf)


def _adamw(params, lr: float):
    """Fused AdamW (one kernel for all parameters, CPU or CUDA), so that ``_step`` can skip a step
    on the device without a sync."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)


def _step(opt: torch.optim.Optimizer, params, skipped: torch.Tensor) -> None:
    """Clip the gradient norm at 1 and step, unless the gradients are not finite: then the fused
    optimiser leaves the weights (and its state) untouched and ``skipped`` counts the step. (The
    first image run at lr 5e-4 went to NaN after 12 of 19 minutes and lost the run; a skipped step
    keeps the last finite weights.)"""
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    bad = (~torch.isfinite(norm)).float()
    opt.found_inf = bad
    opt.step()
    skipped += bad


class _EMA:
    """Exponential moving average of parameters (fp32), ``decay`` with the (1+n)/(10+n) warm-up."""

    def __init__(self, params, decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def applied(self):
        """The EMA weights in the model for the duration (the training weights come back after)."""
        saved = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


class _Budget:
    def __init__(self, minutes: float):
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + 60.0 * minutes

    def over(self) -> bool:
        return time.perf_counter() > self.deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_info(out_dir: Path, info: dict):
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2, default=str))


def _init_linear(m: torch.nn.Module):
    if isinstance(m, torch.nn.Linear):
        torch.nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)


def _zero(*mods):
    for m in mods:
        torch.nn.init.zeros_(m.weight)
        if getattr(m, "bias", None) is not None:
            torch.nn.init.zeros_(m.bias)


def _half_copy_state(module: torch.nn.Module) -> None:
    torch.nn.Module.to(module, dtype=torch.float16)


def weights_bytes(root: str | os.PathLike) -> int:
    """Total size of the files under ``root`` (the 24 MB budget of all shipped testbed files)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def _init_from(folder, modules: dict[str, torch.nn.Module]) -> str | None:
    """Continue from a saved pipeline folder: load each ``modules[name]`` from ``folder/name``
    (diffusers / transformers safetensors). Returns the folder as recorded in ``train_info``."""
    if folder is None:
        return None
    from safetensors.torch import load_file

    folder = Path(folder)
    for name, module in modules.items():
        files = sorted((folder / name).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"init_from: no safetensors weights in {folder / name}")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        missing, unexpected = module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        # tied weights (T5's embeddings) are saved once: their other names may be missing
        tied = set(module.state_dict()) - set(dict(module.named_parameters())) - set(dict(module.named_buffers()))
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(f"init_from: {folder / name} does not match this model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return str(folder)


def _check_init_config(folder, config, keys) -> None:
    """Refuse to continue from a folder whose transformer differs in any of ``keys`` (e.g. RoPE,
    which has no weights of its own and would otherwise pass the state-dict check silently)."""
    if folder is None:
        return
    path = Path(folder) / "transformer" / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no transformer config at {path}")
    saved = json.loads(path.read_text())
    diff = {k: (saved.get(k), config[k]) for k in keys if saved.get(k, config[k]) != config[k]}
    if diff:
        raise ValueError(f"init_from: {folder} has a different transformer ("
                         + ", ".join(f"{k}: saved {a}, this run {b}" for k, (a, b) in diff.items())
                         + "); pass the same --layers/--heads/--width/--rope")


class _Probe:
    """A learning curve: every ``every`` minutes (and at the end), the EMA weights generate ``n``
    samples through the pipeline (``make_pipe()``, 20 steps) and the classifier at
    ``classifier_dir`` scores them with ``ditaccel.evaluate`` (dense accuracy, Fréchet distance
    to the data). The points go to ``train_info.json`` as ``curve``; probing time counts against the
    training budget."""

    def __init__(self, every: float | None, classifier_dir, n: int, make_pipe, ema: "_EMA", modules, device):
        self.enabled = every is not None
        if self.enabled and classifier_dir is None:
            raise ValueError("probe_classifier: the learning curve needs a trained classifier folder")
        self.every, self.n, self.make_pipe, self.ema, self.modules = every, n, make_pipe, ema, modules
        self.classifier_dir, self.device = classifier_dir, device
        self.curve: list[dict] = []
        self.next = None if every is None else time.perf_counter() + 60.0 * every
        self._clf = None

    def _classifier(self):
        if self._clf is None:
            folder = Path(self.classifier_dir)
            kind = json.loads((folder / "config.json").read_text()).get("_class_name", "")
            cls = VideoClassifier if kind == "VideoClassifier" else ImageClassifier
            self._clf = torch.nn.Module.to(cls.from_pretrained(str(folder)), device=self.device,
                                           dtype=torch.float32).eval()
        return self._clf

    def maybe(self, step: int, elapsed: float, final: bool = False):
        if not self.enabled or (not final and time.perf_counter() < self.next):
            return
        for m in self.modules:
            m.eval()
        point = {"step": step, "minutes": round(elapsed / 60, 2)}
        try:
            with self.ema.applied():
                r = evaluate(self.make_pipe(), None, n=self.n, steps=20, batch_size=min(self.n, 32),
                             classifier=self._classifier(), n_reference=256)
            point.update({k: v for k, v in r.items() if k.startswith(("accuracy_dense", "fd_dense"))})
        except Exception as e:  # noqa: BLE001 - a failed probe (e.g. NaN samples) must not end the run
            point["error"] = f"{type(e).__name__}: {e}"[:300]
        for m in self.modules:
            m.train()
        self.curve.append(point)
        tqdm.write(f"probe at step {step}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in point.items()))
        self.next = time.perf_counter() + 60.0 * self.every


def _maybe_compiled(model: torch.nn.Module, enabled: bool):
    """``torch.compile(model)`` when ``enabled``; if compiling fails at the first call, warn and
    train eagerly (the run's speed changes, not its result)."""
    if not enabled:
        return model
    compiled, state = torch.compile(model), {"eager": False}

    def forward(*args, **kwargs):
        if state["eager"]:
            return model(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, say so
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training eagerly", stacklevel=2)
            state["eager"] = True
            return model(*args, **kwargs)

    return forward


class _Plan:
    """The step count the learning-rate schedule decays over.

    Given (``steps``), it is fixed and the run is a fixed function of the seed. Otherwise it is
    fitted to the wall-clock budget: from step ``start`` on, every ``every`` steps (the first time
    after ``first``), the rate over the last stretch sets ``steps = done + rate * remaining * 0.97``,
    so the cosine decay ends inside the budget whatever the GPU, and follows the rate when a job
    sharing the GPU starts or stops. ``history`` holds the ``(done, steps)`` fits (in
    ``train_info.json``); passing the final count as ``steps`` gives the same recipe with a fixed
    schedule.
    """

    def __init__(self, steps: int | None, default: int, *, start: int = 50, first: int = 200, every: int = 1000):
        self.fixed = steps is not None
        self.steps = steps if steps is not None else default
        self.start, self.first, self.every = start, first, every
        self.mark: tuple[int, float] | None = None
        self.history: list[tuple[int, int]] = []

    def update(self, done: int, budget: "_Budget", now: float | None = None):
        """Call after each step with the steps done so far."""
        if self.fixed or done < self.start:
            return
        now = time.perf_counter() if now is None else now
        if self.mark is None:
            self.mark = (done, now)
            return
        d0, t0 = self.mark
        if done - d0 < (self.every if self.history else self.first):
            return
        rate = (done - d0) / max(1e-9, now - t0)
        self.steps = max(done + 1, done + int(rate * (budget.deadline - now) * 0.97))
        self.history.append((done, self.steps))
        self.mark = (done, now)


def _loop(name, plan: _Plan, budget, progress, step_fn, probe: _Probe | None = None):
    """Run ``step_fn(i) -> loss`` until ``plan.steps`` or the budget (``probe``: the learning
    curve, probed on its schedule and once at the end).

    Returns (steps done, [(step, loss) every 50 steps], steady-state steps/s measured after step 50).
    """
    losses, smooth = [], None
    bar = tqdm(total=plan.steps, desc=f"train {name}", disable=not progress, dynamic_ncols=True,
               mininterval=10.0)
    done, t_mark, i_mark = 0, None, 0
    i = 0
    while i < plan.steps:
        if budget.over():
            break
        loss = step_fn(i)
        done = i + 1
        if i % 50 == 0 or i == plan.steps - 1:
            v = float(loss)  # synchronises
            if t_mark is None and i >= 50:
                t_mark, i_mark = time.perf_counter(), done
            smooth = v if smooth is None else 0.9 * smooth + 0.1 * v
            losses.append((i, v))
            bar.set_postfix(loss=f"{smooth:.4f}")
        before = plan.steps
        plan.update(done, budget)
        if plan.steps != before:
            bar.total = plan.steps
        bar.update(1)
        i += 1
        if probe is not None:
            probe.maybe(done, budget.elapsed())
    if probe is not None:
        probe.maybe(done, budget.elapsed(), final=True)
    bar.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rate = (done - i_mark) / (time.perf_counter() - t_mark) if t_mark is not None and done > i_mark else None
    return done, losses, rate


def _setup(recipe: dict, dev: torch.device, *, toy: bool, steps, batch_size, lr, minutes: float):
    """(step plan, batch size, peak learning rate, budget) of a generator run; TF32 on CUDA."""
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    plan = _Plan(steps or (recipe["steps"] if toy else None), recipe["steps"])
    return plan, batch_size or recipe["batch_size"], lr or recipe["lr"], _Budget(minutes)


def _save_run(out_dir: Path, ema: _EMA, modules, make_pipe, info: dict) -> dict:
    """The EMA weights in fp16, saved as the pipeline ``make_pipe()`` builds, plus ``train_info.json``."""
    ema.copy_to()
    for m in modules:
        m.eval().cpu()
        _half_copy_state(m)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_pipe().save_pretrained(out_dir)
    _write_info(out_dir, info)
    return info


_SDPA_BACKENDS = ("cudnn", "flash", "efficient")


def _sdpa_first(name: str | None):
    """A context in which SDPA tries backend ``name`` first, then PyTorch's others (``None``: a
    no-op)."""
    if name is None:
        return contextlib.nullcontext()
    if name not in _SDPA_BACKENDS:
        raise ValueError(f"attention_backend must be one of {_SDPA_BACKENDS} or None, got {name!r}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    every = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    order = [every[name]] + [b for k, b in every.items() if k != name] + [SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _run_info(name: str, *, plan: _Plan, probe: _Probe, init, done, losses, rate, seconds, **extra) -> dict:
    return dict(model=name, init_from=init, curve=probe.curve, steps_done=done, steps_planned=plan.steps,
                steps_fitted=plan.history, seconds=round(seconds, 1), steps_per_s=rate, **extra, losses=losses,
                torch=torch.__version__)


# --------------------------------------------------------------------------------------------
# image DiT
# --------------------------------------------------------------------------------------------
def build_image_transformer(*, toy: bool = False, seed: int = 0) -> DiTTransformer2DModel:
    """The image DiT with DiT's initialisation (xavier linears, N(0, 0.02) embeddings, adaLN-Zero:
    modulation and output projections zero)."""
    cfg = dict(IMAGE_MODEL_CONFIG, **(TOY_IMAGE_MODEL if toy else {}))

    def make():
        m = DiTTransformer2DModel(**cfg)
        m.apply(_init_linear)
        w = m.pos_embed.proj.weight
        torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        torch.nn.init.zeros_(m.pos_embed.proj.bias)
        for block in m.transformer_blocks:
            emb = block.norm1.emb
            torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
            torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
            torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
            _zero(block.norm1.linear)
        _zero(m.proj_out_1, m.proj_out_2)
        return m

    return _seeded(seed, make)


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
    out_dir, dev = Path(out_dir), _device(device)
    recipe = dict(IMAGE_RECIPE, **(TOY_RECIPE if toy else {}))
    if prediction_type is not None:
        recipe["prediction_type"] = prediction_type
    if recipe["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {recipe['prediction_type']!r}")
    plan, bs, peak, budget = _setup(recipe, dev, toy=toy, steps=steps, batch_size=batch_size, lr=lr, minutes=minutes)

    model = build_image_transformer(toy=toy, seed=seed)
    init = _init_from(init_from, {"transformer": model})
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
    opt = _adamw(model.parameters(), peak)
    skipped = torch.zeros((), device=dev)
    ema = _EMA(model.parameters(), recipe["ema_decay"])
    batches = _Chunks(lambda n: data.sample(n, data_gen, device=dev), bs, DATA_CHUNK)
    fwd = _maybe_compiled(model, dev.type == "cuda" if compile is None else compile)
    T = sched.config.num_train_timesteps

    def step_fn(i):
        for group in opt.param_groups:
            group["lr"] = _lr_at(i, plan.steps, recipe["warmup"], peak)
        x0, y = batches.next()
        y = y.to(dev)
        drop = torch.rand(bs, generator=noise_gen, device=dev) < recipe["label_dropout"]
        y = torch.where(drop, torch.full_like(y, null), y)
        t = _timesteps(bs, T, recipe, noise_gen, dev)
        noise = torch.randn(x0.shape, generator=noise_gen, device=dev)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(dev):
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
        _step(opt, model.parameters(), skipped)
        ema.update()
        return loss.detach()

    def image_pipe():
        pipe = PixelDiTPipeline(model, DPMSolverMultistepScheduler.from_config(sched.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    probe = _Probe(probe_every, probe_classifier, probe_samples, image_pipe, ema, [model], dev)
    done, losses, rate = _loop("image", plan, budget, progress, step_fn, probe)
    _sync(dev)
    info = _run_info("image", plan=plan, probe=probe, init=init, done=done, losses=losses, rate=rate,
                     seconds=budget.elapsed(), seed=seed, device=str(dev), batch_size=bs, lr=peak, toy=toy,
                     recipe=recipe, params=sum(p.numel() for p in model.parameters()),
                     skipped_steps=int(skipped.item()))
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.1  # the config's value, as constructed
    return _save_run(out_dir, ema, [model], image_pipe, info)


# --------------------------------------------------------------------------------------------
# video CogVideoX
# --------------------------------------------------------------------------------------------
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
        m.apply(_init_linear)
        w = m.patch_embed.proj.weight
        torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        torch.nn.init.zeros_(m.patch_embed.proj.bias)
        for block in m.transformer_blocks:
            _zero(block.norm1.linear, block.norm2.linear)
            for norm in (block.attn1.norm_q, block.attn1.norm_k):
                torch.nn.init.constant_(norm.weight, float(qk_norm_init))
        _zero(m.norm_out.linear, m.proj_out)
        return text_encoder, m

    text_encoder, transformer = _seeded(seed, make)
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
    out_dir, dev = Path(out_dir), _device(device)
    recipe = dict(VIDEO_RECIPE, **(TOY_RECIPE if toy else {}))
    if qk_norm_init is not None:
        recipe["qk_norm_init"] = qk_norm_init
    backend_first = _sdpa_first(attention_backend)
    plan, bs, peak, budget = _setup(recipe, dev, toy=toy, steps=steps, batch_size=batch_size, lr=lr, minutes=minutes)

    tokenizer, text_encoder, model = build_video_components(toy=toy, seed=seed, qk_norm_init=recipe["qk_norm_init"],
                                                            heads=heads, layers=layers, width=width, rope=rope)
    _check_init_config(init_from, model.config, ("num_layers", "num_attention_heads", "attention_head_dim",
                                                  "use_rotary_positional_embeddings"))
    init = _init_from(init_from, {"transformer": model, "text_encoder": text_encoder})
    model.to(dev).train()
    text_encoder.to(dev).train()
    cfg = model.config
    data = VideoCaptions(frames=cfg.sample_frames, size=cfg.sample_height)
    sched = CogVideoXDDIMScheduler(**VIDEO_SCHEDULER_CONFIG)
    ac = sched.alphas_cumprod.to(dev, torch.float32)
    data_gen = make_generator(seed + 1)
    noise_gen = torch.Generator(device=dev).manual_seed(seed + 2)
    params = list(model.parameters()) + list(text_encoder.parameters())
    opt = _adamw(params, peak)
    skipped = torch.zeros((), device=dev)
    ema = _EMA(params, recipe["ema_decay"])
    drop_gen = make_generator(seed + 3)  # caption dropout on the CPU: no device sync per step
    batches = _Chunks(lambda n: data.sample(n, data_gen, device=dev)[:2], bs, DATA_CHUNK)
    fwd = _maybe_compiled(model, dev.type == "cuda" if compile is None else compile)
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
            group["lr"] = _lr_at(i, plan.steps, recipe["warmup"], peak)
        video, captions = batches.next()
        x0 = video.permute(0, 2, 1, 3, 4)  # (B, F, C, H, W): CogVideoX's layout
        drop = (torch.rand(bs, generator=drop_gen) < recipe["caption_dropout"]).tolist()
        ids = ids_of(["" if d else c for c, d in zip(captions, drop)])
        t = _timesteps(bs, T, recipe, noise_gen, dev)
        noise = torch.randn(x0.shape, generator=noise_gen, device=dev)
        a = ac[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        with _autocast(dev):
            emb = text_encoder(ids)[0]
            pred = fwd(hidden_states=xt, encoder_hidden_states=emb, timestep=t, image_rotary_emb=rotary,
                       return_dict=False)[0]
        loss = F.mse_loss(pred.float(), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _step(opt, params, skipped)
        ema.update()
        return loss.detach()

    probe = _Probe(probe_every, probe_classifier, probe_samples, video_pipe, ema, [model, text_encoder], dev)
    with backend_first:
        done, losses, rate = _loop("video", plan, budget, progress, step_fn, probe)
    _sync(dev)
    info = _run_info("video", plan=plan, probe=probe, init=init, done=done, losses=losses, rate=rate,
                     seconds=budget.elapsed(), seed=seed, device=str(dev), batch_size=bs, lr=peak, toy=toy,
                     attention_backend=attention_backend, rope=rope,
                     recipe=recipe, params=sum(p.numel() for p in model.parameters()),
                     skipped_steps=int(skipped.item()),
                     text_encoder_params=sum(p.numel() for p in text_encoder.parameters()))
    return _save_run(out_dir, ema, [model, text_encoder], video_pipe, info)


# --------------------------------------------------------------------------------------------
# classifiers
# --------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Robustness to generation artefacts: Gaussian noise (sigma up to 0.2) and a mild blur, each
    on a random half of the batch."""
    n = x.shape[0]
    shape = (n,) + (1,) * (x.ndim - 1)
    u = torch.rand((2,) + shape, generator=g, device=x.device)
    sigma = 0.2 * u[0] * (u[1] < 0.5)
    x = x + sigma * torch.randn(x.shape, generator=g, device=x.device)
    flat = x
    if x.ndim == 5:  # blur frames as images
        flat = x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[-2:])
    blurred = F.avg_pool2d(flat, 3, stride=1, padding=1, count_include_pad=False)
    if x.ndim == 5:
        blurred = blurred.reshape(x.shape[0], x.shape[2], x.shape[1], *x.shape[-2:]).transpose(1, 2)
    mix = 0.7 * (torch.rand(shape, generator=g, device=x.device) < 0.3)
    return (1 - mix) * x + mix * blurred


@torch.no_grad()
def _accuracy_image(clf, data, n, seed, dev, bs=256):
    g, correct = make_generator(seed), 0
    for s in range(0, n, bs):
        x, y = data.sample(min(bs, n - s), g, device=dev)
        with _autocast(dev):
            correct += (clf(x).argmax(-1).cpu() == y).sum().item()
    return correct / n


@torch.no_grad()
def _accuracy_video(clf, data, n, seed, dev, bs=64):
    g = make_generator(seed)
    correct = {k: 0 for k in VideoCaptions.FACTORS}
    for s in range(0, n, bs):
        x, _, lab = data.sample(min(bs, n - s), g, device=dev)
        with _autocast(dev):
            out = clf(x)
        for k in correct:
            correct[k] += (out[k].argmax(-1).cpu() == lab[k]).sum().item()
    return {k: v / n for k, v in correct.items()}


def train_classifiers(
    out_dir: str | os.PathLike,
    *,
    minutes: float = 4.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    toy: bool = False,
    which: tuple[str, ...] = ("image", "video"),
    steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Train the image and/or video classifier and save them to ``out_dir/image_classifier`` and
    ``out_dir/video_classifier`` (fp16 safetensors + ``config.json``).

    Args:
        out_dir: parent folder (the shipped layout: ``ditaccel/testbed/weights``).
        minutes: budget for both together (image gets a third, video two thirds).
        seed: fixes initialisation, data and augmentation streams.
        device, toy, progress: as ``train_image``.
        which: any of ``"image"``, ``"video"``.
        steps: override the step count of each (``CLASSIFIER_RECIPE``).

    Returns:
        ``{"image": info, "video": info}``; each info has the held-out accuracy on fresh
        procedural data (``eval_accuracy``), also written to ``train_info.json``.
    """
    out_dir, dev = Path(out_dir), _device(device)
    r = dict(CLASSIFIER_RECIPE)
    if toy:
        r.update(image_steps=3, image_batch_size=8, video_steps=3, video_batch_size=4, eval_samples=16)
    unknown = set(which) - {"image", "video"}
    if unknown:
        raise ValueError(f"which: unknown {sorted(unknown)}; use 'image' and/or 'video'")
    results = {}
    share = {"image": 1 / 3, "video": 2 / 3} if len(which) == 2 else {which[0]: 1.0} if which else {}
    for kind in which:
        budget = _Budget(minutes * share[kind])
        n_steps = steps or r[f"{kind}_steps"]
        bs = r[f"{kind}_batch_size"]
        if kind == "image":
            data = ImageClasses(size=16 if toy else 64)
            clf = _seeded(seed, lambda: ImageClassifier(channels=(8, 16) if toy else (32, 64, 96, 128),
                                                        feature_dim=16 if toy else 128))
        else:
            data = VideoCaptions(frames=4, size=16) if toy else VideoCaptions()
            clf = _seeded(seed, lambda: VideoClassifier(channels=(8, 16) if toy else (24, 48, 96, 128),
                                                        feature_dim=16 if toy else 128))
        clf.to(dev).train()
        opt = torch.optim.AdamW(clf.parameters(), lr=r["lr"], weight_decay=0.01)
        data_gen, aug_gen = make_generator(seed + 1), torch.Generator(device=dev).manual_seed(seed + 2)

        def step_fn(i, kind=kind, clf=clf, opt=opt, data=data, bs=bs, n_steps=n_steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(i, n_steps, max(1, n_steps // 20), r["lr"])
            if kind == "image":
                x, y = data.sample(bs, data_gen, device=dev)
                with _autocast(dev):
                    loss = F.cross_entropy(clf(_augment(x, aug_gen)).float(), y.to(dev))
            else:
                x, _, lab = data.sample(bs, data_gen, device=dev)
                with _autocast(dev):
                    out = clf(_augment(x, aug_gen))
                loss = sum(F.cross_entropy(out[k].float(), lab[k].to(dev)) for k in out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        done, losses, rate = _loop(f"{kind} classifier", _Plan(n_steps, n_steps), budget, progress, step_fn)
        _sync(dev)
        seconds = budget.elapsed()
        clf.eval()
        acc_fn = _accuracy_image if kind == "image" else _accuracy_video
        acc = acc_fn(clf, data, r["eval_samples"], seed + 12345, dev)
        clf.cpu()
        _half_copy_state(clf)
        folder = out_dir / f"{kind}_classifier"
        folder.mkdir(parents=True, exist_ok=True)
        clf.save_pretrained(folder)
        info = dict(model=f"{kind}_classifier", steps_done=done, steps_planned=n_steps, seconds=round(seconds, 1),
                    steps_per_s=rate,
                    seed=seed, device=str(dev), batch_size=bs, toy=toy, eval_accuracy=acc,
                    params=sum(p.numel() for p in clf.parameters()), losses=losses, torch=torch.__version__)
        _write_info(folder, info)
        results[kind] = info
    return results


# --------------------------------------------------------------------------------------------
# command line (python -m ditaccel.testbed.train ...)
# --------------------------------------------------------------------------------------------
#: the ``ditaccel testbed train`` line of ``ditaccel testbed --help``
HELP = "train a testbed model on procedural data (image, video, classifiers)"


def add_arguments(parser) -> None:
    """Mount ``image``, ``video`` and ``classifiers`` as subcommands of ``parser`` (the ``ditaccel
    testbed train`` parser of ``ditaccel.cli``), each with only the options it takes."""
    sub = subcommands(parser, "what", "WHAT")
    minutes = float_in(0.0, low_open=True)

    def common(name, help, default_minutes, out_help):
        p = subcommand(sub, name, help=help, progress=True, func=run)
        p.add_argument("--out", help=out_help)
        p.add_argument("--minutes", type=minutes, default=default_minutes, help="time budget")
        p.add_argument("--seed", type=SEED, default=0, help="initialisation, data and noise seed")
        p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1")
        p.add_argument("--toy", action="store_true", help="tiny sizes for a CPU smoke test")
        return p

    def generator(p):
        p.add_argument("--steps", type=POSITIVE, help="the LR schedule's step count (default: fitted to --minutes)")
        p.add_argument("--init", help="continue from the weights of a folder this command wrote (default: a fresh "
                       "initialisation)")
        p.add_argument("--probe-every", type=minutes, help="score the EMA weights' samples every M minutes and at the "
                       "end (needs --probe-classifier; default: no learning curve)")
        p.add_argument("--probe-classifier", help="the classifier folder for --probe-every (default: none)")
        p.add_argument("--probe-samples", type=POSITIVE, default=48, help="samples per probe")
        p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                       help="torch.compile the transformer (auto: on CUDA)")

    weights = "the package's weights folder, where `ditaccel eval` and the demo look"
    p = common("image", "the pixel-space image DiT", 15.0, f"output folder (default: {weights}, image/)")
    generator(p)
    p.add_argument("--prediction-type", choices=["v_prediction", "epsilon"], help="the training target (default: the "
                   "recipe's)")

    p = common("video", "the pixel-space video CogVideoX", 18.0, f"output folder (default: {weights}, video/)")
    generator(p)
    p.add_argument("--qk-norm-init", type=float, help="initial q/k LayerNorm weight (default: the recipe's)")
    p.add_argument("--heads", type=POSITIVE, help="attention heads (default: the config's; the head dim is "
                   "width / heads)")
    p.add_argument("--layers", type=POSITIVE, help="transformer blocks (default: the config's 6)")
    p.add_argument("--width", type=POSITIVE, help="attention width, heads x head dim, a multiple of 16 (default: "
                   "the config's 192)")
    p.add_argument("--rope", action="store_true", help="3D rotary position embeddings (CogVideoX 5b layout) "
                   "instead of the 2b sin-cos table")
    p.add_argument("--attention-backend", choices=list(_SDPA_BACKENDS),
                   help="the SDPA backend tried first while training (default: PyTorch's order)")

    p = common("classifiers", "the image and video classifiers", 4.0, f"the parent folder of image_classifier/ and "
               f"video_classifier/ (default: {weights})")
    p.add_argument("--steps", type=POSITIVE, help="steps of each classifier (default: the recipe's)")
    p.add_argument("--only", choices=["image", "video"], help="train only this one (default: both)")


def _check_args(a) -> None:
    """Paths and option combinations, before any model is built: one-line ``UsageError``s."""
    _check_device(a.device)
    if a.out is not None:  # created with its parents (a weights tree), so only: a folder, somewhere writable
        out = Path(a.out).absolute()
        if out.exists() and not out.is_dir():
            raise UsageError("--out", f"{a.out!r} exists and is not a folder")
        existing = next(p for p in (out, *out.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UsageError("--out", f"cannot create {a.out!r}: {str(existing)!r} is not a writable folder")
    if a.what == "classifiers":
        return
    if a.init is not None and not (Path(a.init) / "transformer" / "config.json").is_file():
        raise UsageError("--init", f"{a.init!r} is not a folder written by `ditaccel testbed train {a.what}` "
                                   "(no transformer/config.json)")
    if a.probe_every is not None and a.probe_classifier is None:
        raise UsageError("--probe-every", "needs --probe-classifier (a trained classifier folder)")
    if a.probe_classifier is not None:
        if a.probe_every is None:
            raise UsageError("--probe-classifier", "only with --probe-every")
        if not (Path(a.probe_classifier) / "config.json").is_file():
            raise UsageError("--probe-classifier", f"{a.probe_classifier!r} is not a classifier folder (no "
                                                   "config.json); train one with `ditaccel testbed train classifiers`")
    if a.what == "video" and a.width is not None and a.width % 16:
        raise UsageError("--width", f"must be a multiple of 16 (CogVideoX's 3D sin-cos embedding), got {a.width}")
    if a.what == "video" and a.heads is not None and a.width is not None and a.width % a.heads:
        raise UsageError("--heads", f"must divide the width {a.width}, got {a.heads}")


def run(a) -> int:
    """``ditaccel testbed train image|video|classifiers`` (parsed by ``add_arguments``): prints the
    training info as JSON; bad arguments raise ``ValueError`` before any model is built."""
    _check_args(a)
    kw = dict(seed=a.seed, device=a.device, toy=a.toy, steps=a.steps, progress=progress_on(a))
    out = a.out or (WEIGHTS_DIR if a.what == "classifiers" else WEIGHTS_DIR / a.what)
    if a.what != "classifiers":
        kw.update(compile={"auto": None, "on": True, "off": False}[a.compile], init_from=a.init,
                  probe_every=a.probe_every, probe_classifier=a.probe_classifier, probe_samples=a.probe_samples)
    if a.what == "image":
        info = train_image(out, minutes=a.minutes, prediction_type=a.prediction_type, **kw)
    elif a.what == "video":
        info = train_video(out, minutes=a.minutes, qk_norm_init=a.qk_norm_init, heads=a.heads, layers=a.layers,
                           width=a.width, attention_backend=a.attention_backend, rope=a.rope, **kw)
    else:
        which = (a.only,) if a.only else ("image", "video")
        info = train_classifiers(out, minutes=a.minutes, which=which, **kw)
    print(json.dumps({k: v for k, v in info.items() if k != "losses"} if "losses" in info else
                     {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in info.items()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditaccel testbed train ...`` (the same parser and errors): 0 on success, 2 on bad arguments."""
    return tool_main("testbed train", add_arguments, argv, help=HELP)


if __name__ == "__main__":
    raise SystemExit(main())
