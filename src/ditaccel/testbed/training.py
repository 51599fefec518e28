"""The training machinery every testbed model shares (``image_training``, ``video_training``,
``classifier_training``): device and autocast, seeded construction, the learning-rate schedule,
training timesteps, chunked batches, the fused AdamW step that skips non-finite gradients, the
EMA, the wall-clock budget and the step plan fitted to it, the loop itself, the learning-curve
probe, the ``torch.compile`` fallback and the SDPA backend order.

Determinism: the model initialisation, the data stream and the noise stream each come from their
own seeded generator, so a run with a given step count is a fixed function of ``seed`` (up to
the non-determinism of GPU kernels); without one, the fitted schedule (``StepPlan``) also depends
on the speed.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..evaluate import evaluate
from .classifier import ImageClassifier, VideoClassifier

__all__ = [
    "EMA",
    "SDPA_BACKENDS",
    "Budget",
    "Chunks",
    "Probe",
    "StepPlan",
    "adamw",
    "autocast",
    "clipped_step",
    "lr_at",
    "maybe_compiled",
    "resolve_device",
    "run_info",
    "sample_timesteps",
    "sdpa_first",
    "seeded",
    "setup_run",
    "sync",
    "train_loop",
]


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ``"auto"``: CUDA if available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights); on the CPU, none."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def seeded(seed: int, make):
    """``make()`` under a private RNG state seeded with ``seed`` (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """The learning rate at ``step``: linear warm-up to ``peak``, then cosine decay to 10% of it at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def sample_timesteps(n: int, T: int, recipe: dict, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    """Training timesteps in [0, T): a fraction ``recipe["t_logit_frac"]`` logit-normal (t / T =
    sigmoid(``t_logit_mean`` + N(0, 1))), the rest uniform."""
    uniform = torch.rand(n, generator=gen, device=dev)
    logit = torch.sigmoid(recipe["t_logit_mean"] + torch.randn(n, generator=gen, device=dev))
    pick = torch.rand(n, generator=gen, device=dev) < recipe["t_logit_frac"]
    return (torch.where(pick, logit, uniform) * T).long().clamp(0, T - 1)


class Chunks:
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


def adamw(params, lr: float):
    """Fused AdamW (one kernel for all parameters, CPU or CUDA), so that ``clipped_step`` can skip a step
    on the device without a sync."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)


def clipped_step(opt: torch.optim.Optimizer, params, skipped: torch.Tensor) -> None:
    """Clip the gradient norm at 1 and step, unless the gradients are not finite: then the fused
    optimiser leaves the weights (and its state) untouched and ``skipped`` counts the step. (The
    first image run at lr 5e-4 went to NaN after 12 of 19 minutes and lost the run; a skipped step
    keeps the last finite weights.)"""
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    bad = (~torch.isfinite(norm)).float()
    opt.found_inf = bad
    opt.step()
    skipped += bad


class EMA:
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


class Budget:
    """A wall-clock budget of ``minutes``, from now."""

    def __init__(self, minutes: float):
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + 60.0 * minutes

    def over(self) -> bool:
        return time.perf_counter() > self.deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def sync(device):
    """Wait for ``device``'s queued work (CUDA; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Probe:
    """A learning curve: every ``every`` minutes (and at the end), the EMA weights generate ``n``
    samples through the pipeline (``make_pipe()``, 20 steps) and the classifier at
    ``classifier_dir`` scores them with ``ditaccel.evaluate`` (dense accuracy, Fréchet distance
    to the data). The points go to ``train_info.json`` as ``curve``; probing time counts against the
    training budget."""

    def __init__(self, every: float | None, classifier_dir, n: int, make_pipe, ema: "EMA", modules, device):
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


def maybe_compiled(model: torch.nn.Module, enabled: bool):
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


class StepPlan:
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

    def update(self, done: int, budget: "Budget", now: float | None = None):
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


def train_loop(name, plan: StepPlan, budget, progress, step_fn, probe: Probe | None = None):
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


def setup_run(recipe: dict, dev: torch.device, *, toy: bool, steps, batch_size, lr, minutes: float):
    """(step plan, batch size, peak learning rate, budget) of a generator run; TF32 on CUDA."""
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    plan = StepPlan(steps or (recipe["steps"] if toy else None), recipe["steps"])
    return plan, batch_size or recipe["batch_size"], lr or recipe["lr"], Budget(minutes)


SDPA_BACKENDS = ("cudnn", "flash", "efficient")


def sdpa_first(name: str | None):
    """A context in which SDPA tries backend ``name`` first, then PyTorch's others (``None``: a
    no-op)."""
    if name is None:
        return contextlib.nullcontext()
    if name not in SDPA_BACKENDS:
        raise ValueError(f"attention_backend must be one of {SDPA_BACKENDS} or None, got {name!r}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    every = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    order = [every[name]] + [b for k, b in every.items() if k != name] + [SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def run_info(name: str, *, plan: StepPlan, probe: Probe, init, done, losses, rate, seconds, **extra) -> dict:
    """The ``train_info.json`` record of a generator run (``extra``: its settings)."""
    return dict(model=name, init_from=init, curve=probe.curve, steps_done=done, steps_planned=plan.steps,
                steps_fitted=plan.history, seconds=round(seconds, 1), steps_per_s=rate, **extra, losses=losses,
                torch=torch.__version__)
