"""DiTFastAttn (Yuan et al., 2024): per-(layer, step) choice between full attention, window
attention with residual sharing (``wars``), sharing across timesteps (``ast``), sharing across
the CFG halves (``asc``) and ``wars+asc``; plus ``wa`` (window attention alone, without the
residual), an ablation only: the paper's evidence that the residual is what keeps quality.

This module decides and caches; it never looks at a model. It sees one attention call through
the small ``AttentionCall`` protocol (implemented by ``ditaccel.processors``) and computes with
``ditaccel.kernels``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..kernels.tiles import tma_available
from ..kernels.window import WindowSpec, window_attention, window_tile_classes, window_tile_fraction
from ..kernels.window_residual import full_and_window_attention

FULL, WARS, AST, ASC, WARS_ASC, WA = "full", "wars", "ast", "asc", "wars+asc", "wa"
#: the paper's methods
METHODS: tuple[str, ...] = (FULL, WARS, AST, ASC, WARS_ASC)
#: methods for ablations only, never searched by default: ``wa`` is window attention without the
#: residual of ``wars``
ABLATION_METHODS: tuple[str, ...] = (WA,)
ALL_METHODS: tuple[str, ...] = METHODS + ABLATION_METHODS
#: the paper's candidate order, most compressing first
CANDIDATES: tuple[str, ...] = (AST, WARS_ASC, WARS, ASC)
#: the paper's thresholds D1..D6
PRESETS: dict[str, float] = {f"D{i}": round(0.025 * i, 3) for i in range(1, 7)}
WINDOW_KINDS = ("band1d", "neighborhood2d")
SEARCHES = ("greedy", "local")
#: the search losses: ``"relative"`` (ours, symmetric) and ``"official"`` (thu-nics/DiTFastAttn's)
LOSSES = ("relative", "official")


@dataclass
class DiTFastAttnConfig:
    """Settings of DiTFastAttn's plan search and of the window it uses.

    Attributes:
        threshold: the error budget δ of the greedy search (the paper's D1..D6 are 0.025..0.15;
            a preset name such as ``"D6"`` is accepted). Larger compresses more and costs
            quality. 0 keeps every layer ``full``.
        window: ``"band1d"`` (the paper: a band over the row-major flattened tokens) or
            ``"neighborhood2d"`` (a (2r+1)×(2r+1) box on the token grid, the same cost at the
            same ``window_size``, better at keeping the vertical neighbours).
        window_size: fraction of the keys an interior query sees. 0.25 is the paper's
            band of N/8 tokens on each side; for ``neighborhood2d`` each grid axis gets a
            radius of ``round(sqrt(window_size) * side / 2)``.
        candidates: methods tried for each (layer, step), in order; the first within budget
            wins. The default is the paper's order (most compressing first). ``"wa"`` (window
            attention without the residual, costing the same as ``"wars"``) may be listed for
            the ablation of residual sharing.
        search: ``"greedy"`` is the paper's search (for each layer and candidate, the whole
            transformer runs again: up to layers × candidates forward passes per step).
            ``"local"`` (ours, faster) scores every candidate on each layer's own output during
            the one all-``full`` pass; each layer takes its first candidate scoring under a common
            level τ, and a binary search finds the largest τ whose column keeps the transformer
            output within δ (the bound greedy's last layer has). About log2(4n) + 2 passes per
            step instead of up to 4n + 2; a different plan.
        loss: the error L(O, O') both searches compare with the budget (and ``local`` scores
            candidates with). ``"relative"`` (default) is mean(clip(|O−O'| / (max(|O|, |O'|) +
            1e-6), 0, 10)): symmetric, never divides by a near-zero or negative number unless
            both outputs are near zero. ``"official"`` reproduces thu-nics/DiTFastAttn's
            ``compression_loss``: mean(clip(|(O−O') / (max(O, O') + 1e-6)|, 0, 10)) with a
            *signed* max, which blows up (to the clip at 10) wherever the larger of the two
            values is near zero, including wherever both are negative and one is near zero;
            kept to reproduce the paper's plans. Recorded as ``metadata["loss"]``.
        cfg: whether calls batch classifier-free guidance. ``None`` detects it per call
            (the two halves of the latent input are identical); set it when that heuristic
            cannot hold (e.g. a batch of one prompt repeated twice without CFG).
        show_progress: show a progress bar during calibration.
    """

    threshold: float | str = 0.1
    window: str = "band1d"
    window_size: float = 0.25
    candidates: tuple[str, ...] = CANDIDATES
    search: str = "greedy"
    loss: str = "relative"
    cfg: bool | None = None
    show_progress: bool = True

    def __post_init__(self):
        if isinstance(self.threshold, str):
            if self.threshold not in PRESETS:
                raise ValueError(f"threshold: unknown preset {self.threshold!r}; use one of {sorted(PRESETS)} or a float")
            self.threshold = PRESETS[self.threshold]
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a finite float >= 0, got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if self.window not in WINDOW_KINDS:
            raise ValueError(f"window must be one of {WINDOW_KINDS}, got {self.window!r}")
        if not (0.0 < self.window_size <= 1.0):
            raise ValueError(f"window_size must be in (0, 1], got {self.window_size!r}")
        self.candidates = tuple(self.candidates)
        searchable = CANDIDATES + ABLATION_METHODS
        bad = [c for c in self.candidates if c not in searchable]
        if bad or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates must be distinct values among {searchable}, got {self.candidates!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.cfg not in (None, True, False):
            raise ValueError(f"cfg must be None, True or False, got {self.cfg!r}")


def make_window(kind: str, window_size: float, grid: tuple[int, int], text_tokens: int = 0,
                text_position: str = "prefix") -> WindowSpec:
    """The window of ``kind`` that lets an interior query see ``window_size`` of the keys."""
    gh, gw = grid
    if kind == "band1d":
        r = round(window_size * gh * gw / 2)
        return WindowSpec.band(grid, r, text_tokens=text_tokens, text_position=text_position)
    if kind == "neighborhood2d":
        s = math.sqrt(window_size) / 2
        return WindowSpec.neighborhood(grid, (round(s * gh), round(s * gw)),
                                       text_tokens=text_tokens, text_position=text_position)
    raise ValueError(f"window must be one of {WINDOW_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class StepAction:
    """What one layer does at one step, and which caches it keeps or frees afterwards.

    keep_out: store this step's attention-module output (a later ``ast`` step reads it).
    keep_res: at a ``full`` step, store the window residual for ``"all"`` rows or only the
        ``"cond"`` half (when only ``wars+asc`` steps read it); ``None`` stores nothing.
    release_out / release_res: this step is the cache's last reader; free it afterwards.
    """

    method: str
    keep_out: bool = False
    keep_res: str | None = None
    release_out: bool = False
    release_res: bool = False


def layer_schedule(methods: list[str]) -> list[StepAction]:
    """Cache actions for one layer's row of a plan: every cache holds only what a later step
    reads, and is dropped right after its last reader."""
    n = len(methods)
    actions = []
    for s, m in enumerate(methods):
        nxt = methods[s + 1] if s + 1 < n else None
        keep_out = m != AST and nxt == AST
        release_out = m == AST and nxt != AST
        keep_res = None
        release_res = False
        if m == FULL:
            readers = []
            for later in methods[s + 1:]:
                if later == FULL:
                    break
                if later in (WARS, WARS_ASC):
                    readers.append(later)
            if readers:
                keep_res = "all" if WARS in readers else "cond"
        if m in (WARS, WARS_ASC):
            rest = methods[s + 1:]
            nxt_full = rest.index(FULL) if FULL in rest else len(rest)
            release_res = not any(x in (WARS, WARS_ASC) for x in rest[:nxt_full])
        actions.append(StepAction(m, keep_out, keep_res, release_out, release_res))
    return actions


CALIBRATION_ACTION = {m: StepAction(m, keep_out=True, keep_res="all" if m == FULL else None) for m in ALL_METHODS}
"""During calibration the future is unknown: keep every output and every residual."""


# ------------------------------------------------------------------------- one attention call
class AttentionCall(Protocol):
    """One call of a self-attention module, as the method sees it (implemented by processors).

    ``rows`` selects batch rows (``None``: all). Head-space tensors are (B, H, L, D).
    """

    batch_size: int

    def full(self, rows: slice | None = None) -> torch.Tensor:
        """The unmodified module output for these rows."""

    def qkv(self, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected (and normalised) q, k, v for these rows."""

    def project(self, heads: torch.Tensor) -> torch.Tensor:
        """Module output from the attention output in head space."""


@dataclass
class LayerCache:
    out: torch.Tensor | None = None
    res: torch.Tensor | None = None
    res_rows: str | None = None  # "all" or "cond"

    def nbytes(self) -> int:
        outs = self.out if isinstance(self.out, tuple) else (self.out,)  # joint layers: (image, text)
        return sum(t.numel() * t.element_size() for t in (*outs, self.res) if t is not None)

    def release(self) -> None:
        self.out = self.res = self.res_rows = None


@dataclass
class CallCost:
    """Attention work of one call, in units of one dense attention over the whole batch."""

    fraction: float
    extra_window: float = 0.0  # residual-making window pass on a full step


def run_layer(action: StepAction, call: AttentionCall, cache: LayerCache, window: WindowSpec,
              cond: int | None, write: bool = True) -> tuple[torch.Tensor, CallCost]:
    """Run one layer at one step as ``action`` says; returns the module output and its cost.

    cond: index (0/1) of the conditional CFG half, or ``None`` when this call has no CFG.
    write: update ``cache`` (False for the trial runs of calibration).
    """
    m = action.method
    if m in (ASC, WARS_ASC) and cond is None:
        raise RuntimeError(f"method {m!r} needs a CFG-batched call, and this call has none")
    b = call.batch_size
    half = None if cond is None else slice(cond * (b // 2), (cond + 1) * (b // 2))

    if m == AST:
        cached = cache.out[0] if isinstance(cache.out, tuple) else cache.out  # joint layers: (image, text)
        if cached is None or cached.shape[0] != b:
            raise RuntimeError("ast: no cached output from an earlier step of this generation")
        out, cost = cache.out, CallCost(0.0)
    elif m == FULL and action.keep_res is not None and write:  # trial runs skip the residual
        q, k, v = call.qkv()
        rows = slice(None) if action.keep_res == "all" or cond is None else half
        share = 1.0 if rows == slice(None) else 0.5
        if tma_available(q, k, v):  # one kernel computes each tile once: the window, then the rest
            if share == 1.0:
                o, w = full_and_window_attention(q, k, v, window)
            else:  # the residual of the conditional half only; the other half plain dense
                o = torch.empty_like(q)
                o[rows], w = full_and_window_attention(q[rows], k[rows], v[rows], window)
                other = slice((1 - cond) * (b // 2), (2 - cond) * (b // 2))
                o[other] = F.scaled_dot_product_attention(q[other], k[other], v[other])
            extra = _mixed_fraction(window) * share  # boundary tiles are visited by both passes
        else:  # dense attention and a separate window pass
            o = F.scaled_dot_product_attention(q, k, v)
            w = window_attention(q[rows], k[rows], v[rows], window)
            extra = _tile_fraction(window) * share
        cache.res, cache.res_rows = (o[rows] - w), ("all" if share == 1.0 else "cond")
        out, cost = call.project(o), CallCost(1.0, extra)
    elif m == FULL:
        out, cost = call.full(), CallCost(1.0)
    elif m == ASC:
        out, cost = _both_halves(call.full(half)), CallCost(0.5)
    elif m == WA:  # the ablation: the window alone, no residual
        q, k, v = call.qkv()
        out, cost = call.project(window_attention(q, k, v, window)), CallCost(_tile_fraction(window))
    else:  # wars, wars+asc
        if cache.res is None:
            raise RuntimeError(f"{m}: no residual from an earlier full step of this generation")
        rows = half if m == WARS_ASC else None
        q, k, v = call.qkv(rows)
        if m == WARS_ASC:
            res = cache.res if cache.res_rows == "cond" else cache.res[half]
        else:
            if cache.res_rows != "all":
                raise RuntimeError("wars: the cached residual holds only the conditional half")
            res = cache.res
        o = window_attention(q, k, v, window) + res
        out = call.project(o)
        if m == WARS_ASC:
            out = _both_halves(out)
        cost = CallCost(_tile_fraction(window) * (0.5 if m == WARS_ASC else 1.0))

    if write:
        if action.keep_out:
            cache.out = out
        elif action.release_out or m != AST:
            cache.out = None
        if action.release_res:
            cache.res, cache.res_rows = None, None
    return out, cost


@functools.lru_cache(maxsize=64)
def _tile_fraction(window: WindowSpec) -> float:
    return window_tile_fraction(window)


@functools.lru_cache(maxsize=64)
def _mixed_fraction(window: WindowSpec) -> float:
    """Fraction of the 128 x 128 tiles the window boundary cuts (computed by both fused passes)."""
    return float((window_tile_classes(window, 128, 128) == 1).float().mean())


def _both_halves(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x], dim=0)


def relative_l1(o: torch.Tensor, o2: torch.Tensor) -> float:
    """The search loss: mean over elements of clip(|O−O'| / (max(|O|,|O'|) + 1e-6), 0, 10).

    (The official code divides by a signed max; this is the corrected, symmetric form.)"""
    o, o2 = o.float(), o2.float()
    rel = (o - o2).abs() / (torch.maximum(o.abs(), o2.abs()) + 1e-6)
    return rel.clamp(0, 10).mean().item()


def official_relative_l1(o: torch.Tensor, o2: torch.Tensor) -> float:
    """thu-nics/DiTFastAttn's ``compression_loss`` (``dit_fast_attention.py``, default metric):
    mean over every element of clip(|(O−O') / (max(O, O') + 1e-6)|, 0, 10), max *signed* and
    elementwise, over the whole transformer output (both CFG halves, every sample and channel).

    Where O = O' = −1e-6 the quotient is 0/0 = NaN, as in the official code, and the NaN
    propagates to the mean (a NaN loss is never under a budget). Computed in float32 (the
    official code computes in the model's dtype)."""
    o, o2 = o.float(), o2.float()
    rel = ((o - o2) / (torch.maximum(o, o2) + 1e-6)).abs()
    return rel.clamp(0, 10).mean().item()


LOSS_FUNCTIONS = {"relative": relative_l1, "official": official_relative_l1}


def loss_function(name: str):
    """The search loss called ``name`` (one of ``LOSSES``): ``fn(O, O') -> float``."""
    if name not in LOSS_FUNCTIONS:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return LOSS_FUNCTIONS[name]


# ------------------------------------------------------------------------------ the method
class DiTFastAttn:
    """Runs a plan (``methods[layer][step]``) inside the runtime.

    The runtime calls ``check_*`` at install/generation start, ``begin_call`` once per
    transformer call and ``attention`` once per self-attention call. ``trial``/``write``/``scoring``
    are used by calibration: ``trial`` is the column of methods to use at the current step (with
    every cache kept), ``write=False`` leaves the caches untouched (trial runs), ``scoring``
    lists candidates to score on each layer's own output (``scores[layer][candidate]``) with
    ``score_loss`` (the configured search loss).
    """

    name = "ditfastattn"

    def __init__(self, methods: list[list[str]], window: str = "band1d", window_size: float = 0.25):
        self.methods = methods
        self.schedules = [layer_schedule(row) for row in methods]
        self.window_kind, self.window_size = window, window_size
        self.uses_asc = any(m in (ASC, WARS_ASC) for row in methods for m in row)
        self.trial: list[str] | None = None
        self.write = True
        self.scoring: tuple[str, ...] | None = None
        self.scores: dict[int, dict[str, float]] = {}
        self.score_loss = relative_l1
        self.expected_grid: tuple[int, int] | None = None  # the plan's calibration grid, if known
        self._windows: dict[tuple, WindowSpec] = {}

    @property
    def num_steps(self) -> int:
        return len(self.methods[0]) if self.methods else 0

    def check_num_layers(self, n: int):
        if n != len(self.methods):
            raise ValueError(f"plan.methods: the plan has {len(self.methods)} layers, the transformer has {n}")

    def check_num_steps(self, n: int):
        if self.trial is None and n != self.num_steps:
            raise ValueError(f"num_inference_steps: the plan was made for {self.num_steps} steps, "
                             f"this generation runs {n}")

    def begin_call(self, ctx):
        if self.trial is not None:
            return
        if self.expected_grid is not None and tuple(ctx.grid) != tuple(self.expected_grid) and ctx.step == 0:
            warnings.warn(f"the plan was calibrated at a {self.expected_grid[0]}x{self.expected_grid[1]} token grid, "
                          f"this generation runs {ctx.grid[0]}x{ctx.grid[1]}: its quality is unmeasured here",
                          stacklevel=2)
        if ctx.step >= self.num_steps:
            raise ValueError(f"num_inference_steps: step {ctx.step} is past the plan's {self.num_steps} steps")
        if ctx.cond is None and self.uses_asc:
            raise ValueError(
                "plan uses asc (sharing across the CFG halves) but this generation has no CFG-batched call "
                "(guidance_scale <= 1?). Calibrate without CFG, or apply plan.without_asc().")

    def new_cache(self) -> LayerCache:
        return LayerCache()

    def window(self, grid: tuple[int, int]) -> WindowSpec:
        if grid not in self._windows:
            self._windows[grid] = make_window(self.window_kind, self.window_size, grid)
        return self._windows[grid]

    def attention(self, ctx, layer: int, call: AttentionCall, cache: LayerCache):
        if self.trial is not None:
            action = CALIBRATION_ACTION[self.trial[layer]]
        else:
            action = self.schedules[layer][ctx.step]
        window = self.window(ctx.grid)
        out, cost = run_layer(action, call, cache, window, ctx.cond, write=self.write)
        if self.scoring and ctx.step > 0:
            self.scores[layer] = {
                c: self.score_loss(out, run_layer(CALIBRATION_ACTION[c], call, cache, window, ctx.cond, write=False)[0])
                for c in self.scoring if ctx.cond is not None or c not in (ASC, WARS_ASC)}
        return out, cost.fraction + cost.extra_window, action.method
