"""DiTFastAttn (Yuan et al., 2024): per-(layer, step) choice between full attention, window
attention with residual sharing (``wars``), sharing across timesteps (``ast``), sharing across
the CFG halves (``asc``) and ``wars+asc``; plus ``wa`` (window attention alone, without the
residual), an ablation only: the paper's evidence that the residual is what keeps quality.

This module decides and caches; it never looks at a model. It sees one attention call through
the small ``AttentionCall`` protocol (implemented by ``ditaccel.processors``): ``full()`` and
``core(fn, rows)``, so every method runs at the attention core, in head space, whatever the family
(joint text + image/video sequences included: the window covers the visual tokens only, text rows
and text columns stay dense), and computes with ``ditaccel.kernels``.

CFG comes two ways. Batched (DiT, PixArt, CogVideoX): ``asc`` computes the conditional half's rows
and copies them to the other half. As two transformer calls per step (Wan; Flux and HunyuanVideo
with true CFG), each call in its own cache context (its own per-branch state): the first call of a
step computes an ``asc`` / ``wars+asc`` layer's attention core and leaves its output in a slot
shared by the branches (:class:`CfgPeer`); the other call of the same step takes it instead of
computing, whichever order the pipeline calls them in (diffusers' pipelines call the conditional
branch first; where the unconditional one comes first, the conditional call reuses the
unconditional attention).
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
from .adaspa import SPARSE, AdaSpaConfig

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
WINDOW_KINDS = ("band1d", "neighborhood2d", "neighborhood3d")
SEARCHES = ("greedy", "local")
#: when the window residual of ``wars`` is refreshed: at ``full`` steps (ours), or at ``full`` and
#: ``asc`` steps (thu-nics/DiTFastAttn's code)
RESIDUAL_REFRESHES = ("full", "full+asc")
#: the search losses: ``"relative"`` (ours, symmetric) and ``"official"`` (thu-nics/DiTFastAttn's)
LOSSES = ("relative", "official")
#: how the caches kept between steps (``wars`` residuals, ``ast`` outputs) are stored: ``"model"``
#: (the dtype the model computes in) or ``"float8"`` (float8_e4m3fn with float32 scales, see :class:`Float8Cache`)
CACHE_DTYPES = ("model", "float8")


@dataclass
class DiTFastAttnConfig:
    """Settings of DiTFastAttn's plan search and of the window it uses.

    Attributes:
        threshold: the error budget δ of the greedy search (the paper's D1..D6 are 0.025..0.15;
            a preset name such as ``"D6"`` is accepted). Larger compresses more and costs
            quality. 0 keeps every layer ``full``.
        window: ``"band1d"`` (the paper: a band over the row-major flattened tokens; for video
            the (frame, row, col) order), ``"neighborhood2d"`` (a (2r+1)×(2r+1) box on the
            token grid, the same cost at the same ``window_size``, better at keeping the vertical
            neighbours; video frames stack their rows in that grid) or ``"neighborhood3d"``
            (video: a box over frames, rows and columns of each frame; on images it is the 2D
            box). Text tokens of joint attention are never windowed.
        window_size: fraction of the keys an interior query sees. 0.25 is the paper's
            band of N/8 tokens on each side; for ``neighborhood2d`` each grid axis gets a
            radius of ``round(sqrt(window_size) * side / 2)``, for ``neighborhood3d`` each of
            the three axes ``round(window_size ** (1/3) * side / 2)`` (two axes on images).
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
        residual_refresh: which steps refresh the window residual R = O − W that ``wars`` /
            ``wars+asc`` steps add. ``"full"`` (default, ours): only ``full`` steps; an ``asc``
            step in between leaves R as it was. ``"full+asc"``: also ``asc`` steps, as
            thu-nics/DiTFastAttn's code does (its ``asc`` method counts as a full-attention step
            there): the ``asc`` step computes R for the half it computes (the conditional half,
            or the CFG call that computes) and that R then stands for both halves, also at later
            plain ``wars`` steps. Costs a window pass at such ``asc`` steps; a residual closer in
            time. Recorded as ``metadata["residual_refresh"]``; a plan runs with the rule it was
            calibrated with.
        cache_dtype: how the caches kept between steps are stored. ``"model"`` (default): the window
            residuals of ``wars`` and the outputs ``ast`` reuses stay in the model's dtype.
            ``"float8"``: stored as float8_e4m3fn with a float32 scale (amax / 448) per (batch,
            head) of a residual and per (batch, channel) of an output, dequantized to the
            model's dtype when read: about half the cache memory of bf16 (a quarter of float32),
            at a small quality cost (each value keeps e4m3's 3 mantissa bits: an error of at most
            1/16 of it). The search runs with the caches it configures; recorded as
            ``metadata["cache_dtype"]`` (``Plan.with_cache_dtype`` switches a plan's).
        cfg: whether calls batch classifier-free guidance. ``None`` detects it per call
            (the two halves of the latent input are identical); set it when that heuristic
            cannot hold (e.g. a batch of one prompt repeated twice without CFG).
        show_progress: show a progress bar during calibration.
        adaspa: AdaSpa's settings for mixed plans (``None``: none). With it, ``"sparse"`` (AdaSpa's
            block-sparse attention with the layer's mask) may be listed in ``candidates`` and the
            greedy search tries it like any candidate (the first within budget wins), e.g.
            ``candidates=("ast", "sparse", "wars+asc", "wars", "asc")``. Its mask is the one searched
            at the layer's last ``full`` step before the sparse run: calibration searches a mask at
            every ``full`` step, and the written plan (format 2) turns each full step that a sparse
            run reads into ``"search"`` (dense + block mass: 1.5 dense passes in the FLOP count,
            as AdaSpa's first search). AdaSpa's schedule fields (``warmup``, ``search_at``,
            ``lse_cache``, ``dense_last``, ``dense_layers``, ``first_lse``) are not used: the plan is
            the schedule.
            Needs ``search="greedy"``.
    """

    threshold: float | str = 0.1
    window: str = "band1d"
    window_size: float = 0.25
    candidates: tuple[str, ...] = CANDIDATES
    search: str = "greedy"
    loss: str = "relative"
    residual_refresh: str = "full"
    cache_dtype: str = "model"
    cfg: bool | None = None
    show_progress: bool = True
    adaspa: AdaSpaConfig | None = None

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
        searchable = CANDIDATES + ABLATION_METHODS + (SPARSE,)
        bad = [c for c in self.candidates if c not in searchable]
        if bad or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates must be distinct values among {searchable}, got {self.candidates!r}")
        if self.adaspa is not None and not isinstance(self.adaspa, AdaSpaConfig):
            raise ValueError(f"adaspa must be an AdaSpaConfig or None, got {self.adaspa!r}")
        if SPARSE in self.candidates and self.adaspa is None:
            raise ValueError("candidates: 'sparse' needs AdaSpa's settings: DiTFastAttnConfig(adaspa=AdaSpaConfig(...))")
        if SPARSE in self.candidates and self.search != "greedy":
            raise ValueError(f"search: the 'sparse' candidate is searched by search='greedy' only, got {self.search!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.residual_refresh not in RESIDUAL_REFRESHES:
            raise ValueError(f"residual_refresh must be one of {RESIDUAL_REFRESHES}, got {self.residual_refresh!r}")
        check_cache_dtype(self.cache_dtype)
        if self.cfg not in (None, True, False):
            raise ValueError(f"cfg must be None, True or False, got {self.cfg!r}")


def make_window(kind: str, window_size: float, grid: tuple[int, int], text_tokens: int = 0,
                text_position: str | None = "prefix", frames: int = 1) -> WindowSpec:
    """The window of ``kind`` that lets an interior query see ``window_size`` of the visual keys
    (``text_tokens`` un-windowed text tokens before or after them: ``text_position``; ``frames``:
    the video frames stacked in the grid's rows)."""
    text_position = text_position or "prefix"
    gh, gw = grid
    if kind == "band1d":
        r = round(window_size * gh * gw / 2)
        return WindowSpec.band(grid, r, text_tokens=text_tokens, text_position=text_position)
    if kind == "neighborhood2d" or (kind == "neighborhood3d" and frames == 1):
        s = math.sqrt(window_size) / 2
        radius = (round(s * gh), round(s * gw))
        if kind == "neighborhood2d":
            return WindowSpec.neighborhood(grid, radius, text_tokens=text_tokens, text_position=text_position)
        return WindowSpec.neighborhood3d(grid, 1, (0, *radius), text_tokens, text_position)
    if kind == "neighborhood3d":
        s = window_size ** (1 / 3) / 2
        radius = (round(s * frames), round(s * (gh // frames)), round(s * gw))
        return WindowSpec.neighborhood3d(grid, frames, radius, text_tokens, text_position)
    raise ValueError(f"window must be one of {WINDOW_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class StepAction:
    """What one layer does at one step, and which caches it keeps or frees afterwards.

    keep_out: store this step's attention-module output (a later ``ast`` step reads it).
    keep_res: at a step that refreshes the window residual (``full``; with
        ``residual_refresh="full+asc"`` also ``asc``), store it for ``"all"`` rows or only the
        ``"cond"`` half (a ``full`` step read only by ``wars+asc`` steps; an ``asc`` step, which
        computes that half only); ``None`` stores nothing.
    release_out / release_res: this step is the cache's last reader; free it afterwards.
    """

    method: str
    keep_out: bool = False
    keep_res: str | None = None
    release_out: bool = False
    release_res: bool = False


def refreshes_residual(method: str, residual_refresh: str = "full") -> bool:
    """Whether a step of ``method`` refreshes the window residual under ``residual_refresh``."""
    return method == FULL or (residual_refresh == "full+asc" and method == ASC)


def layer_schedule(methods: list[str], residual_refresh: str = "full") -> list[StepAction]:
    """Cache actions for one layer's row of a plan: every cache holds only what a later step
    reads, and is dropped right after its last reader. A residual is read by the ``wars`` /
    ``wars+asc`` steps after the step that refreshed it, up to the next refreshing step."""
    n = len(methods)
    actions = []
    for s, m in enumerate(methods):
        nxt = methods[s + 1] if s + 1 < n else None
        keep_out = m != AST and nxt == AST
        release_out = m == AST and nxt != AST
        keep_res = None
        release_res = False
        if refreshes_residual(m, residual_refresh):
            readers = []
            for later in methods[s + 1:]:
                if refreshes_residual(later, residual_refresh):
                    break
                if later in (WARS, WARS_ASC):
                    readers.append(later)
            if readers:
                keep_res = "all" if m == FULL and WARS in readers else "cond"
        if m in (WARS, WARS_ASC):
            rest = methods[s + 1:]
            nxt_refresh = next((i for i, x in enumerate(rest) if refreshes_residual(x, residual_refresh)), len(rest))
            release_res = not any(x in (WARS, WARS_ASC) for x in rest[:nxt_refresh])
        actions.append(StepAction(m, keep_out, keep_res, release_out, release_res))
    return actions


CALIBRATION_ACTION = {m: StepAction(m, keep_out=True, keep_res="all" if m == FULL else None) for m in ALL_METHODS}
"""During calibration the future is unknown: keep every output and every residual."""


def calibration_action(method: str, residual_refresh: str = "full") -> StepAction:
    """:data:`CALIBRATION_ACTION` under ``residual_refresh`` (``"full+asc"``: ``asc`` steps keep
    their residual too)."""
    if method == ASC and residual_refresh == "full+asc":
        return StepAction(ASC, keep_out=True, keep_res="cond")
    return CALIBRATION_ACTION[method]


# ------------------------------------------------------------------------- one attention call
class AttentionCall(Protocol):
    """One call of a self-attention module, as the method sees it (implemented by processors).

    Head-space tensors are (B, H, L, D); L is the whole attention sequence (text tokens of joint
    attention included).
    """

    batch_size: int

    def full(self) -> torch.Tensor:
        """The unmodified module output."""

    def core(self, fn, rows: slice | None = None) -> torch.Tensor:
        """The module output with the attention core replaced by ``fn(q, k, v, key_padding_mask)``
        (under context parallelism also ``heads=``: the rank's heads). ``rows``: one CFG half of
        the batch; ``fn`` sees those rows only and its output stands for both halves."""


# ------------------------------------------------------------------------------- cache storage
def check_cache_dtype(cache_dtype) -> str:
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
    return cache_dtype


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@dataclass
class Float8Cache:
    """A cached tensor stored in float8_e4m3fn: ``data * scale`` (``scale`` float32, broadcast over
    the dimensions it has size 1 in) read back in ``dtype``.

    Made by :func:`quantize_fp8`: the scale of each slice is its absolute maximum / 448 (e4m3's
    largest finite value; 1 for an all-zero slice), so every value keeps e4m3's 3 mantissa bits:
    the error of a value x is at most |x| / 16 + scale / 1024 (the second term: values that fall
    into e4m3's subnormal range, below 2^-6 · scale)."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self) -> torch.Tensor:
        return self.data.to(torch.float32).mul_(self.scale).to(self.dtype)  # one float32 temporary

    def rows(self, rows: slice) -> Float8Cache:
        """The batch rows ``rows`` (still stored in float8)."""
        return Float8Cache(self.data[rows], self.scale[rows], self.dtype)


def quantize_fp8(t: torch.Tensor, keep: int) -> Float8Cache:
    """``t`` in float8_e4m3fn with float32 scales. ``keep`` says which dimensions get a scale per index:
    ``keep > 0`` the first ``keep`` (``2`` on a (B, H, L, D) residual: a scale per (batch, head)),
    ``keep < 0`` the first and the last (on a (B, L, C) output: a scale per (batch, channel)); each
    scale covers the rest."""
    if keep > 0:
        dims = tuple(range(keep, t.ndim))
    else:
        dims = tuple(range(1, t.ndim - 1))
    scale = torch.linalg.vector_norm(t, float("inf"), dim=dims, keepdim=True, dtype=torch.float32) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero slice (or an amax that underflows)
    x = t.to(torch.float32, copy=True).div_(scale)  # one float32 temporary; t is left as it was
    # |x| <= 448 up to float32 rounding, which e4m3 rounds to 448 (it overflows to NaN only past 464)
    return Float8Cache(x.to(FP8), scale, t.dtype)


def pack_cache(x, cache_dtype: str, keep: int):
    """A tensor (or a joint layer's tuple of tensors, or ``None``) as the cache stores it under
    ``cache_dtype``: unchanged (``"model"``) or :func:`quantize_fp8` (``"float8"``; ``keep`` as there)."""
    if cache_dtype == "model" or x is None or isinstance(x, Float8Cache):
        return x
    if isinstance(x, tuple):
        return tuple(pack_cache(t, cache_dtype, keep) for t in x)
    return quantize_fp8(x, keep)


def unpack_cache(x):
    """What :func:`pack_cache` stored, back as the tensor (or tuple) the computation reads."""
    if isinstance(x, Float8Cache):
        return x.dequantize()
    if isinstance(x, tuple):
        return tuple(unpack_cache(t) for t in x)
    return x


def cache_nbytes(x) -> int:
    """Bytes a cached value holds: a tensor's, a :class:`Float8Cache`'s (payload and scales), a
    tuple's sum; 0 for ``None``."""
    if x is None:
        return 0
    if isinstance(x, tuple):
        return sum(cache_nbytes(t) for t in x)
    if isinstance(x, Float8Cache):
        return x.nbytes()
    return x.numel() * x.element_size()


#: per-(batch, head) scales of a (B, H, L, D) residual; per-(batch, channel) of a (B, L, C) output
RES_SCALES, OUT_SCALES = 2, -1


@dataclass
class LayerCache:
    """One layer's caches in one CFG-branch state.

    out: the attention-module output a later ``ast`` step reads (joint layers: a tuple).
    res: the window residual O − W in head space, (B, H, L, D) or the rows ``res_rows`` says:
        ``"all"`` (every row of the call), ``"cond"`` (the conditional half of a CFG batch only)
        or ``"shared"`` (the conditional half, standing for both halves: refreshed at an ``asc``
        step under ``residual_refresh="full+asc"``).
    cache_dtype: how ``out`` and ``res`` are stored (``CACHE_DTYPES``): ``"float8"`` keeps them as
        :class:`Float8Cache` (a residual's scales per (batch, head), an output's per (batch, channel));
        ``store_*`` packs, ``output()`` / ``residual()`` read them back in the model's dtype.
    """

    out: torch.Tensor | tuple | Float8Cache | None = None
    res: torch.Tensor | Float8Cache | None = None
    res_rows: str | None = None
    cache_dtype: str = "model"

    def store_out(self, out) -> None:
        self.out = pack_cache(out, self.cache_dtype, OUT_SCALES)

    def store_res(self, res, rows: str) -> None:
        self.res, self.res_rows = pack_cache(res, self.cache_dtype, RES_SCALES), rows

    def output(self):
        return unpack_cache(self.out)

    def residual(self, rows: slice | None = None) -> torch.Tensor:
        """The residual (the batch rows ``rows`` of it), in the model's dtype."""
        res = self.res
        if rows is not None:
            res = res.rows(rows) if isinstance(res, Float8Cache) else res[rows]
        return unpack_cache(res)

    def nbytes(self) -> int:
        return cache_nbytes(self.out) + cache_nbytes(self.res)

    def release(self) -> None:
        self.out = self.res = self.res_rows = None


@dataclass
class SharedCore:
    """A layer's attention-core output left by the first CFG call of a step for the other call:
    the output (``heads``, (B, H, L, D)) and, when that step refreshed it, the window residual."""

    step: int
    branch: str
    heads: torch.Tensor | None
    res: torch.Tensor | Float8Cache | None = None  # as the cache stores it (``LayerCache.store_res``)

    def nbytes(self) -> int:
        return cache_nbytes(self.heads) + cache_nbytes(self.res)

    def release(self) -> None:
        self.heads = self.res = None


class CfgPeer:
    """``asc`` / ``wars+asc`` where CFG runs as two transformer calls per step, each in its own
    CFG-branch state (``branch``: its cache-context name). ``slots`` is shared by the branches of
    one generation (the runtime's): the first call of ``step`` that runs ``method`` on ``layer``
    computes and leaves a :class:`SharedCore` under ``(layer, method)``; a call of another branch
    at the same step takes it (the slot is emptied: nothing stays after its one reader)."""

    def __init__(self, slots: dict, layer: int, step: int, branch: str):
        self.slots, self.layer, self.step, self.branch = slots, layer, step, branch

    def take(self, method: str) -> SharedCore | None:
        key = (self.layer, method)
        got = self.slots.get(key)
        if got is None or got.step != self.step or got.branch == self.branch:
            return None
        del self.slots[key]
        return got

    def put(self, method: str, heads: torch.Tensor, res: torch.Tensor | Float8Cache | None = None) -> None:
        self.slots[(self.layer, method)] = SharedCore(self.step, self.branch, heads, res)


@dataclass
class CallCost:
    """Attention work of one call, in units of one dense attention over the whole batch."""

    fraction: float
    extra_window: float = 0.0  # residual-making window pass on a refreshing step


def _dense(q, k, v, key_padding_mask=None):
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _dense_and_window(q, k, v, key_padding_mask, window: WindowSpec, part: slice, other: slice | None):
    """Dense attention of every row, the window attention of the rows ``part`` (``other``: the
    remaining rows, or ``None`` when ``part`` is all of them), and the window pass's cost as a
    fraction of one dense pass over all rows."""
    share = 1.0 if other is None else 0.5
    if key_padding_mask is None and tma_available(q, k, v):  # one kernel, each tile once: window, then the rest
        if other is None:
            o, w = full_and_window_attention(q, k, v, window)
        else:  # the residual of the conditional half only; the other half plain dense
            o = torch.empty_like(q)
            o[part], w = full_and_window_attention(q[part], k[part], v[part], window)
            o[other] = F.scaled_dot_product_attention(q[other], k[other], v[other])
        return o, w, _mixed_fraction(window) * share  # boundary tiles are visited by both passes
    o = _dense(q, k, v, key_padding_mask)  # dense attention and a separate window pass
    kpm = None if key_padding_mask is None else key_padding_mask[part]
    w = window_attention(q[part], k[part], v[part], window, key_padding_mask=kpm)
    return o, w, _tile_fraction(window) * share


def _check_window(window: WindowSpec, q: torch.Tensor) -> None:
    if q.shape[2] != window.seq_len:
        raise ValueError(f"window: the attention sequence has {q.shape[2]} tokens, but the token grid "
                         f"{window.grid[0]}x{window.grid[1]} and {window.text_tokens} text tokens make "
                         f"{window.seq_len}")


def _residual(m: str, cache: LayerCache, q: torch.Tensor, half: slice | None) -> torch.Tensor:
    """The cached residual for the rows ``q`` holds (``wars``: every row of the call; ``wars+asc``
    with batched CFG: the conditional half)."""
    rows = cache.res_rows
    if m == WARS_ASC and half is not None:
        res = cache.residual(half if rows == "all" else None)
    elif rows == "cond" and half is not None:
        raise RuntimeError("wars: the cached residual holds only the conditional half")
    else:
        res = cache.residual()
        res = torch.cat([res, res]) if rows == "shared" and half is not None else res
    if res.shape != q.shape:
        raise RuntimeError(f"{m}: the cached residual {tuple(res.shape)} does not fit this call's attention "
                           f"{tuple(q.shape)}")
    return res


def _reuse(shared: torch.Tensor):
    def core(q, k, v, key_padding_mask=None, heads=None):
        if shared.shape != q.shape:
            raise ValueError(f"asc: the two CFG calls of this step differ in attention shape ({tuple(shared.shape)} "
                             f"vs {tuple(q.shape)}, e.g. prompts of different lengths): one cannot reuse the other's")
        return shared

    return core


def run_layer(action: StepAction, call: AttentionCall, cache: LayerCache, window: WindowSpec,
              cond: int | None, write: bool = True, peer: CfgPeer | None = None) -> tuple[torch.Tensor, CallCost]:
    """Run one layer at one step as ``action`` says; returns the module output and its cost.

    cond: index (0/1) of the conditional CFG half of a CFG-batched call, else ``None``.
    write: update ``cache`` (False for the trial runs of calibration).
    peer: where CFG runs as separate calls (``cond`` is ``None``): the slot this call shares with
        the other branch's call of the step (``asc``, ``wars+asc``).
    """
    m = action.method
    sharing = m in (ASC, WARS_ASC)
    if sharing and cond is None and peer is None:
        raise RuntimeError(f"method {m!r} needs CFG: a CFG-batched call, or cond / uncond calls in their own "
                           "cache contexts, and this call has neither")
    b = call.batch_size
    half = None if cond is None else slice(cond * (b // 2), (cond + 1) * (b // 2))
    got = peer.take(m) if sharing and cond is None else None

    if m == AST:
        cached = cache.out[0] if isinstance(cache.out, tuple) else cache.out  # joint layers: (image, text)
        if cached is None or cached.shape[0] != b:
            raise RuntimeError("ast: no cached output from an earlier step of this generation")
        out, cost = cache.output(), CallCost(0.0)
    elif got is not None:  # the other CFG call of this step computed this layer's core: reuse it
        out, cost = call.core(_reuse(got.heads)), CallCost(0.0)
        if write and got.res is not None:  # refreshed by that asc step: it stands for this branch too
            cache.store_res(got.res, "all")  # stored already (as this cache stores it)
    elif m == FULL and not (action.keep_res is not None and write):  # trial runs skip the residual
        out, cost = call.full(), CallCost(1.0)
    else:
        if m in (WARS, WARS_ASC) and cache.res is None:
            raise RuntimeError(f"{m}: no residual from an earlier refreshing step of this generation")
        refresh = m in (FULL, ASC) and action.keep_res is not None and write
        made = {}

        def core(q, k, v, key_padding_mask=None, heads=None):
            if refresh or m not in (FULL, ASC):
                _check_window(window, q)
            if m in (FULL, ASC):
                if refresh:
                    part, other = slice(None), None  # asc: q holds the computed half / call only
                    if m == FULL and action.keep_res == "cond" and half is not None:
                        part, other = half, slice((1 - cond) * (b // 2), (2 - cond) * (b // 2))
                    o, w, made["extra"] = _dense_and_window(q, k, v, key_padding_mask, window, part, other)
                    made["res"] = o[part] - w
                    made["rows"] = "all" if other is None else "cond"
                else:
                    o = _dense(q, k, v, key_padding_mask)
            elif m == WA:  # the ablation: the window alone, no residual
                o = window_attention(q, k, v, window, key_padding_mask=key_padding_mask)
            else:  # wars, wars+asc
                o = window_attention(q, k, v, window, key_padding_mask=key_padding_mask) + _residual(m, cache, q, half)
            made["heads"] = o
            return o

        out = call.core(core, half if sharing else None)
        share = 0.5 if sharing and half is not None else 1.0  # batched asc: the conditional half's rows
        fraction = share if m in (FULL, ASC) else _tile_fraction(window) * share
        cost = CallCost(fraction, made.get("extra", 0.0) * share)
        if "res" in made:
            cache.store_res(made["res"], "shared" if m == ASC and half is not None else made["rows"])
        if sharing and half is None:  # the first CFG call of this step: leave it for the other call
            peer.put(m, made["heads"], cache.res if "res" in made else None)

    if write:
        if action.keep_out:
            if m != AST:  # an ast step (calibration keeps every output) keeps what it read, as it is stored
                cache.store_out(out)
        elif action.release_out or m != AST:
            cache.out = None
        if action.release_res:
            cache.res, cache.res_rows = None, None
    return out, cost


def _flat(out):
    """A layer output as one tensor: joint layers return (image, text) pairs, scored together."""
    return torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out


@functools.lru_cache(maxsize=64)
def _tile_fraction(window: WindowSpec) -> float:
    return window_tile_fraction(window)


@functools.lru_cache(maxsize=64)
def _mixed_fraction(window: WindowSpec) -> float:
    """Fraction of the 128 x 128 tiles the window boundary cuts (computed by both fused passes)."""
    return float((window_tile_classes(window, 128, 128) == 1).float().mean())


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

    The step context (``ditaccel.runtime.StepContext``) says how CFG runs: ``cond`` (batched) or
    ``branch`` / ``branches`` / ``shared`` (separate calls, see :class:`CfgPeer`).
    """

    name = "ditfastattn"

    def __init__(self, methods: list[list[str]], window: str = "band1d", window_size: float = 0.25,
                 residual_refresh: str = "full", cache_dtype: str = "model"):
        if residual_refresh not in RESIDUAL_REFRESHES:
            raise ValueError(f"residual_refresh must be one of {RESIDUAL_REFRESHES}, got {residual_refresh!r}")
        self.methods = methods
        self.residual_refresh = residual_refresh
        self.cache_dtype = check_cache_dtype(cache_dtype)
        self.schedules = [layer_schedule(row, residual_refresh) for row in methods]
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
            if ctx.branch is None:
                raise ValueError(
                    "plan uses asc (sharing across the CFG halves) but this generation has no CFG-batched call "
                    "(guidance_scale <= 1?) and no separate cond / uncond calls in their own cache contexts. "
                    "Calibrate without CFG, or apply plan.without_asc().")
            if ctx.step > 0 and ctx.branches < 2:
                raise ValueError(
                    "plan uses asc (sharing across the CFG calls) but this generation makes one transformer call "
                    "per step (no unconditional call: guidance_scale / true_cfg_scale <= 1, or no negative "
                    "prompt?). Calibrate without CFG, or apply plan.without_asc().")

    def new_cache(self) -> LayerCache:
        return LayerCache(cache_dtype=self.cache_dtype)

    def window(self, grid: tuple[int, int], text_tokens: int = 0, text_position: str | None = None,
               frames: int = 1) -> WindowSpec:
        key = (tuple(grid), text_tokens, text_position, frames)
        if key not in self._windows:
            self._windows[key] = make_window(self.window_kind, self.window_size, grid, text_tokens, text_position,
                                             frames)
        return self._windows[key]

    def action(self, layer: int, step: int) -> StepAction:
        """What ``layer`` does at ``step``: the plan's schedule, or during calibration the trial column's
        method with every cache kept."""
        if self.trial is not None:
            return calibration_action(self.trial[layer], self.residual_refresh)
        return self.schedules[layer][step]

    def attention(self, ctx, layer: int, call: AttentionCall, cache: LayerCache):
        action = self.action(layer, ctx.step)
        window = self.window(ctx.grid, ctx.text_tokens, ctx.text_position, ctx.frames)
        peer = None
        if ctx.cond is None and ctx.branch is not None and ctx.shared is not None:
            peer = CfgPeer(ctx.shared, layer, ctx.step, ctx.branch)
        out, cost = run_layer(action, call, cache, window, ctx.cond, write=self.write, peer=peer)
        if self.scoring and ctx.step > 0:
            cfg = ctx.cond is not None or (peer is not None and ctx.branches >= 2)
            self.scores[layer] = {
                c: self.score_loss(_flat(out), _flat(run_layer(calibration_action(c, self.residual_refresh), call,
                                                               cache, window, ctx.cond, write=False, peer=peer)[0]))
                for c in self.scoring if cfg or c not in (ASC, WARS_ASC)}
        return out, cost.fraction + cost.extra_window, action.method
