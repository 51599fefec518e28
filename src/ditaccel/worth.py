"""Worth (``ditaccel worth``): each method against what a user would do instead, at equal cost.

A user who wants a faster generation can already run fewer denoising steps or switch on one of
diffusers' caches. A method is worth adopting where, at the same cost, it gives better quality
than those, alone or on top of a shorter schedule (DESIGN.md §6). This module measures that on
the trained testbeds, against one reference: the dense sample of the same seed and input at
``reference_steps`` (50) steps.

Rows (``Setting``), each a point on the quality/cost plane:

* ``dense`` at fewer steps (the same scheduler, 50 → 40, 30, ... steps);
* diffusers' caches where they apply (``ditaccel.baselines``; the others listed with the reason);
* ``static window``: block-sparse attention with a fixed local mask of the same kept fraction, no
  search (image: a band of blocks along the row-major token order; video: the blocks nearest in
  (frame, row, column), a spatio-temporal box) — what a user could build with FlexAttention;
* ``oracle top-k``: at every step, each query block keeps the key blocks of largest exact
  attention mass from that step's own q/k, at the same density (an upper bound for any
  block-sparse method; slow);
* DiTFastAttn (image) and AdaSpa (video, and a few on image), each at several step counts
  (DiTFastAttn calibrated for each step count).

Costs, as fractions of the reference generation:

* ``total_flops``: all transformer FLOPs (attention core and everything else). Dense rows: from
  a counted dense call. ditaccel rows: the calls' non-attention FLOPs (less the Q/K/V/output
  projections an ``ast`` step skips) plus the attention FLOPs ``ditaccel.stats`` counts. Cache
  rows: counted during a run (``torch.utils.flop_counter``) with the attention cores that ran.
* ``attention_flops``: the attention-core FLOPs alone.
* ``time``: measured generation time on this device (at testbed size the attention is a small
  share of it, so this axis says little about full-size models).
* ``projected_time``: **a model**, not a measurement: the time at full size given the real
  model's attention share ``a`` of a dense step (measured with ``ditaccel bench``):
  ``(1 − a) · other_flops + a · (dense-rate attention + compressed attention / η)``, η the
  compressed kernels' speed relative to dense per FLOP (1 = the hardware limit).

Quality: PSNR / SSIM against the reference sample of the same seed, classifier accuracy (image:
class; video: object and motion), Fréchet distance of classifier features to procedural data.

``verdict`` compares, at each cost level (20%, 30%, ... 60%), the best setting of each family
whose cost is at most that level.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import ditaccel

from . import baselines
from .baselines import measure_flops
from .bench.report import environment, jsonable, missing_matplotlib, result_stem, update_markdown, write_json
from .cli_support import TOOL_DTYPES, positive_int, float_in, printer, progress_bar, tool_main
from .evaluate import (
    default_inputs,
    pipe_kind,
    reference_batches,
    classifier_accuracy,
    classifier_features,
    frechet_distance,
    load_trained,
    psnr,
    ssim,
)
from .evaluate import generate_samples as generate
from .kernels.block_mass import attention_with_lse, block_mass
from .kernels.block_sparse import block_sparse_attention, block_sparse_flops, mask_to_indices
from .methods.adaspa import AdaSpaConfig, keep_counts, text_blocks, topk_blocks
from .methods.ditfastattn import PRESETS, DiTFastAttnConfig
from .models import adapter_for
from .quality import default_guidance, table_inputs, check_run_args, check_weights, resolve_run
from .runtime import install
from .testbed.data import VideoCaptions

__all__ = [
    "COST_LEVELS",
    "DenseMethod",
    "OracleTopK",
    "Setting",
    "StaticWindow",
    "best_at",
    "block_distances",
    "call_profile",
    "image_settings",
    "projected_time",
    "run_worth",
    "verdict",
    "video_settings",
]

#: cost levels of the verdict (fractions of the reference's cost)
COST_LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6)
#: what a user would do instead (the verdict's competitors)
BASELINE_FAMILIES = ("dense (fewer steps)", "diffusers cache")
#: ditaccel's own methods (any options, any step count)
DITACCEL_FAMILIES = ("DiTFastAttn", "DiTFastAttn (official loss)", "AdaSpa", "AdaSpa (options)")
#: rows that are neither: a user-built static mask and an upper bound
REFERENCE_FAMILIES = ("static window", "oracle top-k")
#: method names whose attention runs at the dense kernel's rate in the time model
DENSE_RATE = frozenset({"full", "dense", "search"})


# ====================================================================== reference methods
@dataclass
class _MaskCache:
    kv_indices: torch.Tensor | None = None
    kv_counts: torch.Tensor | None = None
    kept: float = 1.0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv_indices, self.kv_counts) if t is not None)

    def release(self) -> None:
        self.kv_indices = self.kv_counts = None


class _RuntimeMethod:
    """The runtime's method protocol (see ``ditaccel.methods.adaspa.AdaSpa``) for methods that need
    no step count, no layer count and no per-call set-up."""

    name = "method"

    def check_num_layers(self, n: int):
        pass

    def check_num_steps(self, n: int):
        pass

    def begin_call(self, ctx):
        pass

    def new_cache(self):
        return _MaskCache()

    def details(self, caches) -> dict:
        return {}


class DenseMethod(_RuntimeMethod):
    """Dense attention through the runtime, so that ``ditaccel.stats`` counts its FLOPs."""

    name = "dense"

    def attention(self, ctx, layer, call, cache):
        return call.full(), 1.0, "dense"


class _BlockMaskMethod(_RuntimeMethod):
    """Block-sparse attention at every step from ``warmup_steps`` on, with a mask from ``_mask``.
    Text blocks of joint attention are always kept and do not count against the budget, as in
    AdaSpa."""

    name = "block-mask"

    def __init__(self, kept: float, block_size: int = 64, warmup_steps: int = 0):
        if not 0.0 < kept <= 1.0:
            raise ValueError(f"kept must be in (0, 1], got {kept!r}")
        self.kept, self.block_size, self.warmup_steps = float(kept), int(block_size), int(warmup_steps)

    def _always(self, ctx, length: int, device):
        if not ctx.text_tokens:
            return None
        return text_blocks(length, self.block_size, ctx.text_tokens, ctx.text_position, device)

    def _keep(self, nk: int, always, batch: int, heads: int, device) -> torch.Tensor:
        budget = max(nk - (int(always.all(dim=0).sum()) if always is not None else 0), 1)
        return keep_counts(torch.full((batch, heads), 1.0 - self.kept, dtype=torch.float64, device=device), budget)

    def attention(self, ctx, layer: int, call, cache: _MaskCache):
        if ctx.step < self.warmup_steps:
            return call.full(), 1.0, "dense"
        info = {}

        def core(q, k, v, key_padding_mask=None, heads=None):
            mask = self._mask(ctx, q, k, key_padding_mask)
            idx, counts = mask_to_indices(mask)
            b, h, length, d = q.shape
            info["fraction"] = block_sparse_flops(counts, self.block_size, length, d, kv_indices=idx) / (
                4.0 * b * h * length * length * d)
            return block_sparse_attention(q, k, v, idx, counts, block_size=self.block_size,
                                          key_padding_mask=key_padding_mask, validate=False)

        out = call.core(core)
        return out, info["fraction"], self.name


class StaticWindow(_BlockMaskMethod):
    """A fixed local block mask: each query block keeps the ``ceil(kept · budget)`` key blocks
    nearest to it, by ``block_distances`` (``shape="band"``: block index along the row-major
    token order, the paper's 1D band in blocks; ``"box"``: Chebyshev distance of the blocks'
    token centroids in (frame, row, column), each axis scaled by its length, so the kept blocks
    form a box of the grid's proportions). Frames are assumed square (true of the testbeds):
    a video's ``ctx.grid`` is (frames · side, side). No search, no model knowledge."""

    name = "static"

    def __init__(self, kept: float, block_size: int = 64, shape: str = "band", warmup_steps: int = 0):
        super().__init__(kept, block_size, warmup_steps)
        if shape not in ("band", "box"):
            raise ValueError(f"shape must be 'band' or 'box', got {shape!r}")
        self.shape = shape
        self._cached: dict = {}

    def _mask(self, ctx, q, k, key_padding_mask):
        b, h, length, _ = q.shape
        key = (length, ctx.text_tokens, ctx.text_position, ctx.grid, b, h)
        if key not in self._cached:
            always = self._always(ctx, length, q.device)
            dist = block_distances(length, self.block_size, ctx.grid, ctx.text_tokens, ctx.text_position,
                                   self.shape).to(q.device)
            keep = self._keep(dist.shape[-1], always, b, h, q.device)
            self._cached[key] = topk_blocks((-dist).expand(b, h, -1, -1), keep, always)
        return self._cached[key]


class OracleTopK(_BlockMaskMethod):
    """At every step each query block keeps its ``ceil(kept · budget)`` key blocks of largest
    exact attention mass, computed from that step's own q and k (full attention for the LSE,
    then the block mass): the best mask any row-wise block-sparse method of this density could
    choose. Costs more than dense; its FLOPs are counted as the sparse attention alone (the
    hypothetical method that knows the mask)."""

    name = "oracle"

    def _mask(self, ctx, q, k, key_padding_mask):
        b, h, length, _ = q.shape
        _, lse = attention_with_lse(q, k, k, key_padding_mask=key_padding_mask)
        mass = block_mass(q, k, lse.float(), block_size=self.block_size, key_padding_mask=key_padding_mask)
        always = self._always(ctx, length, q.device)
        return topk_blocks(mass, self._keep(mass.shape[-1], always, b, h, q.device), always)


def block_distances(length: int, block_size: int, grid: tuple[int, int], text_tokens: int = 0,
                    text_position: str | None = None, shape: str = "band") -> torch.Tensor:
    """(NB, NB) float distances between the blocks of a sequence of ``length`` tokens.

    ``"band"``: |p − q| in block index. ``"box"``: Chebyshev distance between the centroids of the
    blocks' visual tokens in (frame / F, row / side, column / side), ties broken by a small
    Euclidean term; the visual tokens are row-major frames of ``side × side`` with
    ``grid = (F · side, side)``; text tokens (``text_position`` ``"prefix"`` or ``"suffix"``) are
    not placed (text blocks are kept by the caller). A block with no visual token gets distance 0
    to every block."""
    nb = -(-length // block_size)
    idx = torch.arange(nb, dtype=torch.float64)
    if shape == "band":
        return (idx[:, None] - idx[None, :]).abs()
    rows, side = grid
    frames = max(rows // side, 1)
    visual = length - text_tokens
    start = text_tokens if text_position == "prefix" else 0
    pos = torch.arange(length)
    tok = pos - start
    is_visual = (tok >= 0) & (tok < visual)
    t = tok.clamp(0, max(visual - 1, 0)).double()
    coords = torch.stack([(t // (side * side)) / frames, ((t // side) % side) / side, (t % side) / side], dim=1)
    block = pos // block_size
    weight = torch.zeros(nb, dtype=torch.float64).index_add_(0, block, is_visual.double())
    cent = torch.zeros(nb, 3, dtype=torch.float64).index_add_(0, block, coords * is_visual.double()[:, None])
    has = weight > 0
    cent = cent / weight.clamp(min=1)[:, None]
    diff = (cent[:, None, :] - cent[None, :, :]).abs()
    dist = diff.amax(-1) + 1e-3 * diff.square().sum(-1).sqrt()
    dist[~has, :] = 0
    dist[:, ~has] = 0
    return dist


# ====================================================================== settings
@dataclass(frozen=True)
class Setting:
    """One row: a family, a label, the step count and what runs.

    ``method``: ``None`` (dense), a ``DiTFastAttnConfig`` (calibrated for ``steps``), an
    ``AdaSpaConfig``, a reference method factory (``StaticWindow`` / ``OracleTopK``: called with no
    argument for a fresh instance) or a ``baselines`` cache setting (``cache=True``)."""

    label: str
    family: str
    steps: int
    method: Any = None
    cache: bool = False


def _dense_rows(steps: tuple[int, ...]) -> list[Setting]:
    return [Setting(f"dense {s}", "dense (fewer steps)", s) for s in steps]


def _mask_rows(kept: tuple[float, ...], steps: tuple[int, ...], block_size: int, shape: str) -> list[Setting]:
    rows = []
    for s in steps:
        for f in kept:
            rows.append(Setting(f"window {f:g} @{s}", "static window", s,
                                lambda f=f: StaticWindow(f, block_size, shape)))
            rows.append(Setting(f"oracle {f:g} @{s}", "oracle top-k", s, lambda f=f: OracleTopK(f, block_size)))
    return rows


def _cache_rows(pipe, steps: int, call_kwargs: dict | None) -> list[Setting]:
    """diffusers' caches at ``steps``: through diffusers' own API where the model supports it, else
    through ``baselines``' glue (labelled ``[glue]``); MagCache calibrated with ``call_kwargs``."""
    return [Setting(c.label, "diffusers cache", steps, c, cache=True)
            for c in baselines.cache_settings(pipe, steps, glue=True, call_kwargs=call_kwargs)]


def image_settings(pipe=None, *, reference_steps: int = 50, dense_steps=(50, 40, 30, 25, 20, 15, 12, 10, 8, 6),
                   method_steps=(50, 30, 20, 15, 10), thresholds=tuple(PRESETS), official_loss: bool = True,
                   kept=(0.2, 0.35, 0.5), mask_steps=(50, 20), block_size: int = 32,
                   sparsities=(0.5, 0.7, 0.9), caches: bool = True, call_kwargs: dict | None = None) -> list[Setting]:
    """The image testbed's rows: dense at fewer steps, caches, static band and oracle at ``kept``,
    DiTFastAttn at every threshold and step count (with the official loss at the reference step
    count when the config offers it), AdaSpa at a few sparsities (block ``block_size``)."""
    rows = _dense_rows(dense_steps)
    if caches and pipe is not None:
        rows += _cache_rows(pipe, reference_steps, call_kwargs)
    rows += _mask_rows(kept, mask_steps, block_size, "band")
    for s in method_steps:
        for name in thresholds:
            rows.append(Setting(f"{name} @{s}", "DiTFastAttn", s, DiTFastAttnConfig(threshold=name,
                                                                                   show_progress=False)))
    if official_loss and "loss" in DiTFastAttnConfig.__dataclass_fields__:
        for name in thresholds:
            rows.append(Setting(f"{name} official @{reference_steps}", "DiTFastAttn (official loss)",
                                reference_steps, DiTFastAttnConfig(threshold=name, show_progress=False,
                                                                   loss="official")))
    for s in (reference_steps, 20):
        for sp in sparsities:
            rows.append(Setting(f"s={sp:g} @{s}", "AdaSpa", s, AdaSpaConfig(sparsity=sp, block_size=block_size)))
    return rows


#: AdaSpa options measured on the video testbed (field -> value), when the config has the field
VIDEO_OPTIONS = {
    "no tiers": dict(head_adaptive=False),
    "mass tiers": dict(head_rule="mass"),
    "top-p 0.9": dict(head_rule="top_p", target_recall=0.9),
    "top-p 0.95": dict(head_rule="top_p", target_recall=0.95),
    "dense last 10%": dict(dense_last=0.1),
    "dense layer 0": dict(dense_layers=1),
    "4 searches": dict(search_at=(0.2, 0.4, 0.6, 0.8)),
}


def _option_config(sparsity: float, block_size: int, options: dict) -> AdaSpaConfig | None:
    fields = AdaSpaConfig.__dataclass_fields__
    if any(k not in fields for k in options):
        return None  # an option this version does not offer
    return AdaSpaConfig(sparsity=sparsity, block_size=block_size, **options)


def video_settings(pipe=None, *, reference_steps: int = 50, dense_steps=(50, 40, 30, 25, 20, 15, 12, 10, 8, 6),
                   method_steps=(50, 30, 20, 15, 10), sparsities=(0.5, 0.6, 0.7, 0.8, 0.9),
                   kept=(0.2, 0.35, 0.5), mask_steps=(50, 20), block_size: int = 64,
                   option_sparsities=(0.5, 0.8), option_steps=(50, 20), caches: bool = True,
                   call_kwargs: dict | None = None) -> list[Setting]:
    """The video testbed's rows: dense at fewer steps, caches, static 3D box and oracle at
    ``kept``, AdaSpa at every sparsity and step count, and AdaSpa's options (``VIDEO_OPTIONS``)."""
    rows = _dense_rows(dense_steps)
    if caches and pipe is not None:
        rows += _cache_rows(pipe, reference_steps, call_kwargs)
    rows += _mask_rows(kept, mask_steps, block_size, "box")
    for s in method_steps:
        for sp in sparsities:
            rows.append(Setting(f"s={sp:g} @{s}", "AdaSpa", s, AdaSpaConfig(sparsity=sp, block_size=block_size)))
    for s in option_steps:
        for sp in option_sparsities:
            for name, options in VIDEO_OPTIONS.items():
                config = _option_config(sp, block_size, options)
                if config is not None:
                    rows.append(Setting(f"s={sp:g} {name} @{s}", "AdaSpa (options)", s, config))
    return rows


# ====================================================================== costs
@dataclass
class CallProfile:
    """FLOPs of one dense transformer call for one sample (its CFG batch included).

    ``attention``: the self-attention cores (as ``ditaccel.stats`` counts them); ``other``:
    everything else; ``projections``: per attention layer, its Q/K/V and output projections
    (what an ``ast`` step skips)."""

    attention: float
    other: float
    projections: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.attention + self.other


class _Projections:
    """Q/K/V and output projection FLOPs of each attention layer, summed over the calls made
    while it is installed (forward hooks on the four linears)."""

    def __init__(self, attention_modules):
        self.flops = [0.0] * len(attention_modules)
        self._handles = [lin.register_forward_hook(lambda mod, args, out, i=i: self._add(i, mod, args[0]))
                         for i, m in enumerate(attention_modules) for lin in (m.to_q, m.to_k, m.to_v, m.to_out[0])]

    def _add(self, i, mod, x):
        self.flops[i] += 2.0 * x.numel() / x.shape[-1] * mod.in_features * mod.out_features

    def close(self):
        for h in self._handles:
            h.remove()


def _attention_modules(pipe):
    return adapter_for(pipe.transformer).attention_modules(pipe.transformer)


def call_profile(pipe, call_kwargs: dict) -> CallProfile:
    """Count one sample's dense transformer call: ``call_kwargs`` run the pipeline for one sample
    and one step (FLOPs do not depend on the timestep), counted by ``baselines.measure_flops``."""
    projections = _Projections(_attention_modules(pipe))
    try:
        counted = measure_flops(pipe, dict(call_kwargs, num_inference_steps=1))
    finally:
        projections.close()
    if counted["transformer_calls"] != 1:
        raise RuntimeError(f"call_profile: expected one transformer call for a 1-step generation, got "
                           f"{counted['transformer_calls']}")
    return CallProfile(attention=float(counted["attention_flops"]),
                       other=float(counted["total_flops"] - counted["attention_flops"]),
                       projections=projections.flops)


def projected_time(other: float, attention_dense_rate: float, attention_compressed: float, share: float,
                   efficiency: float = 1.0) -> float:
    """The model of full-size time (fraction of the reference): non-attention work and attention
    at the dense rate scale with their FLOPs, compressed attention runs at ``efficiency`` × the
    dense kernel's rate. ``share``: the attention share of a dense step's time at full size."""
    if not 0.0 <= share <= 1.0 or efficiency <= 0:
        raise ValueError(f"share must be in [0, 1] and efficiency > 0, got {share!r}, {efficiency!r}")
    return (1.0 - share) * other + share * (attention_dense_rate + attention_compressed / efficiency)


# ====================================================================== verdict
def best_at(rows: list[dict], families, level: float, axis: str = "total_flops", metric: str = "psnr"):
    """The row of ``families`` with the best ``metric`` among those whose ``axis`` cost is at most
    ``level`` (ties: the cheaper), or None."""
    pool = [r for r in rows if r["family"] in families and r[axis] <= level + 1e-9 and math.isfinite(r[metric])]
    if not pool:
        return None
    return max(pool, key=lambda r: (r[metric], -r[axis]))


def verdict(rows: list[dict], axis: str = "total_flops", levels=COST_LEVELS, metric: str = "psnr") -> list[dict]:
    """Per cost level: the best dense fewer-step row, the best cache row, the best static-window
    and oracle rows, the best ditaccel row, and whether ditaccel beats both baselines there
    (``"ditaccel"``, ``"baseline"``, or ``"none"`` when no ditaccel row is that cheap)."""
    out = []
    for level in levels:
        best = {name: best_at(rows, fams, level, axis, metric) for name, fams in (
            ("dense", ("dense (fewer steps)",)), ("cache", ("diffusers cache",)),
            ("window", ("static window",)), ("oracle", ("oracle top-k",)), ("ditaccel", DITACCEL_FAMILIES))}
        rivals = [best[k][metric] for k in ("dense", "cache") if best[k] is not None]
        if best["ditaccel"] is None:
            winner = "none"
        else:
            winner = "ditaccel" if all(best["ditaccel"][metric] > x for x in rivals) else "baseline"
        margin = None if best["ditaccel"] is None or not rivals else best["ditaccel"][metric] - max(rivals)
        out.append({"level": level, "axis": axis, "metric": metric, "winner": winner, "margin": margin,
                    **{k: (None if v is None else v["label"]) for k, v in best.items()},
                    **{f"{k}_{metric}": (None if v is None else v[metric]) for k, v in best.items()}})
    return out


# ====================================================================== measuring
@dataclass
class _Run:
    """What every row of one testbed shares."""

    pipe: Any
    kind: str
    inputs: list
    seeds: list[int]
    batch_size: int
    call_kwargs: dict
    classifier: Any
    reference: torch.Tensor
    reference_time: float
    reference_steps: int
    profile: CallProfile
    labels: Any
    features_reference: torch.Tensor | None
    warmup: bool
    share: float
    efficiency: float


def _call_kwargs(run: _Run, steps: int, n: int) -> dict:
    """The pipeline arguments of one call generating the first ``n`` samples, as ``_generate``'s."""
    key = "class_labels" if run.kind == "image" else "prompt"
    return dict(run.call_kwargs, **{key: list(run.inputs[:n])}, num_inference_steps=steps, output_type="pt",
                generator=[torch.Generator().manual_seed(int(x)) for x in run.seeds[:n]])


def _generate(run: _Run, steps: int, on_batch=None, n: int | None = None):
    n = len(run.seeds) if n is None else n
    return generate(run.pipe, run.kind, run.inputs[:n], run.seeds[:n], steps, run.batch_size, run.call_kwargs,
                    on_batch)


def _quality(run: _Run, samples: torch.Tensor) -> dict:
    per_psnr = psnr(samples, run.reference, reduction="none")
    per_ssim = ssim(samples, run.reference, reduction="none")
    out = {"psnr": float(per_psnr.mean()), "psnr_min": float(per_psnr.min()), "ssim": float(per_ssim.mean())}
    if run.classifier is not None:
        acc = classifier_accuracy(run.classifier, samples, run.labels, batch_size=run.batch_size)
        if isinstance(acc, dict):
            out["accuracy"] = acc["object+motion"]
            out["accuracy_factors"] = acc
        else:
            out["accuracy"] = acc
        feats = classifier_features(run.classifier, samples, batch_size=run.batch_size)
        out["fd_data"] = frechet_distance(feats, run.features_reference)
    return out


def _calibrate(run: _Run, config: DiTFastAttnConfig, steps: int):
    key = "class_labels" if run.kind == "image" else "prompt"
    cal = default_inputs(run.pipe, run.kind, 8, 1)
    return ditaccel.calibrate(run.pipe, config, num_inference_steps=steps, **{key: cal},
                              generator=torch.Generator().manual_seed(10_007), **run.call_kwargs)


def _measure(run: _Run, setting: Setting) -> dict:
    """Generate every sample with ``setting`` and return its row: costs and quality."""
    pipe, prof, n = run.pipe, run.profile, len(run.seeds)
    ref_calls = run.reference_steps * n
    row = {"label": setting.label, "family": setting.family, "steps": setting.steps}
    t_cal = 0.0
    attn_done = attn_dense_rate = other = 0.0
    counts: dict[str, int] = {}

    if setting.cache:
        counted = min(run.batch_size, n)
        baselines.enable(pipe, setting.method)  # (MagCache calibrates here, uncounted)
        try:
            flops = baselines.measure_flops(pipe, _call_kwargs(run, setting.steps, counted))  # also the warm-up
            scale = n / counted
            attn_done = attn_dense_rate = flops["attention_flops"] * scale
            other = (flops["total_flops"] - flops["attention_flops"]) * scale
            samples, seconds = _generate(run, setting.steps)
        finally:
            baselines.disable(pipe)
        row["transformer_calls"] = flops["transformer_calls"] * math.ceil(n / counted)  # counted: one batch
    else:
        method = setting.method
        if isinstance(method, DiTFastAttnConfig):
            t0 = time.perf_counter()
            method = _calibrate(run, method, setting.steps)
            t_cal = time.perf_counter() - t0
        skipped_proj = 0.0

        def collect():
            nonlocal attn_done, attn_dense_rate, skipped_proj
            st = ditaccel.stats(pipe)
            dense = st.attention_tflops_dense * 1e12
            attn_done += st.attention_flops_ratio * dense
            attn_dense_rate += sum(v for m, v in st.attention_flops_by_method.items() if m in DENSE_RATE) * dense
            for m, c in st.method_counts.items():
                counts[m] = counts.get(m, 0) + c
            if st.method_counts.get("ast"):  # an ast step also skips the layer's Q/K/V and output projections
                samples_in_call = dense / (prof.attention * setting.steps)
                per_layer = sum(prof.projections) / len(prof.projections)
                skipped_proj += st.method_counts["ast"] * per_layer * samples_in_call

        if method is None:
            install(pipe, DenseMethod())
        elif isinstance(method, (AdaSpaConfig, ditaccel.Plan)):
            ditaccel.apply(pipe, method)
        else:
            install(pipe, method())
        try:
            if run.warmup:
                _generate(run, setting.steps, n=min(run.batch_size, n))
            samples, seconds = _generate(run, setting.steps, collect)
        finally:
            ditaccel.remove(pipe)
        other = prof.other * setting.steps * n - skipped_proj
        row["transformer_calls"] = setting.steps * math.ceil(n / run.batch_size)  # one call per step and batch
        row["method_counts"] = counts
    ref_attn, ref_other = prof.attention * ref_calls, prof.other * ref_calls
    compressed = attn_done - attn_dense_rate
    row.update(
        total_flops=(other + attn_done) / (ref_attn + ref_other),
        attention_flops=attn_done / ref_attn,
        other_flops=other / ref_other,
        time=seconds / run.reference_time,
        time_s=seconds,
        calibration_s=t_cal,
        attention_dense_rate=attn_dense_rate / ref_attn,
        attention_compressed=compressed / ref_attn,
        projected_time=projected_time(other / ref_other, attn_dense_rate / ref_attn, compressed / ref_attn,
                                      run.share),
        projected_time_kernels=projected_time(other / ref_other, attn_dense_rate / ref_attn, compressed / ref_attn,
                                              run.share, run.efficiency),
    )
    row.update(_quality(run, samples))
    return row


def _labels(kind: str, inputs: list):
    if kind == "image":
        return torch.as_tensor([int(x) for x in inputs])
    parsed = [VideoCaptions.parse(p) for p in inputs]
    return {k: torch.as_tensor([p[k] for p in parsed]) for k in VideoCaptions.FACTORS}


def run_table(which: str, settings: list[Setting] | None = None, *, weights_dir=None, device: str = "cpu",
              dtype: torch.dtype = torch.float32, n: int = 64, batch_size: int = 32, reference_steps: int = 50,
              guidance_scale: float | None = None, n_reference: int = 512, share: float = 1.0,
              efficiency: float = 1.0, settings_kwargs: dict | None = None, log=print, progress=None) -> dict:
    """Measure every setting of one testbed against its ``reference_steps``-step dense samples.

    ``settings`` default: ``image_settings(pipe)`` / ``video_settings(pipe)`` (with
    ``settings_kwargs``). ``share`` / ``efficiency``: the time model's attention share at full size
    and compressed-kernel efficiency (``projected_time``). ``progress``: a ``tqdm``-like factory for
    a bar counting the rows (the dense reference first); None: no bar. Returns ``{"table", "n", ..., "reference",
    "profile", "rows", "verdict", "caches_not_applicable"}``.
    """
    if which not in ("image", "video"):
        raise ValueError(f"which must be 'image' or 'video', got {which!r}")
    t0 = time.perf_counter()
    pipe, clf = load_trained(which, weights_dir=weights_dir, device=device, dtype=dtype)
    kind = pipe_kind(pipe)
    guidance = default_guidance(pipe) if guidance_scale is None else float(guidance_scale)
    inputs = list(table_inputs(pipe, which, n))
    if settings is None:
        make = image_settings if which == "image" else video_settings
        settings = make(pipe, reference_steps=reference_steps, call_kwargs={"guidance_scale": guidance},
                        **(settings_kwargs or {}))
    run = _Run(pipe=pipe, kind=kind, inputs=inputs, seeds=list(range(n)), batch_size=batch_size,
               call_kwargs={"guidance_scale": guidance}, classifier=clf, reference=None, reference_time=0.0,
               reference_steps=reference_steps, profile=None, labels=_labels(kind, inputs), features_reference=None,
               warmup=str(device).startswith("cuda"), share=share, efficiency=efficiency)
    bar = progress(total=len(settings) + 1, desc=f"worth {which}", unit="row") if progress is not None else None
    if run.warmup:
        _generate(run, reference_steps, n=min(batch_size, n))
    run.reference, run.reference_time = _generate(run, reference_steps)
    run.features_reference = torch.cat([
        classifier_features(clf, chunk, batch_size=batch_size)
        for chunk in reference_batches(kind, run.reference, run.labels, n_reference, 1_000_003, batch_size)])
    run.profile = call_profile(pipe, _call_kwargs(run, 1, 1))
    reference = {"steps": reference_steps, "time_s": run.reference_time, **_quality(run, run.reference)}
    if bar is not None:
        bar.update()
    log(f"{which} reference: dense {reference_steps} steps, {run.reference_time:.2f} s, accuracy "
        f"{reference.get('accuracy', math.nan):.3f}; one sample's call: attention {run.profile.attention / 1e9:.3g} "
        f"GFLOP, other {run.profile.other / 1e9:.3g} GFLOP")
    rows = []
    for s in settings:
        r = _measure(run, s)
        rows.append(r)
        if bar is not None:
            bar.update()
        log(f"{which} {s.label}: FLOPs {100 * r['total_flops']:.1f}% (attention {100 * r['attention_flops']:.1f}%), "
            f"projected {100 * r['projected_time']:.1f}%, PSNR {r['psnr']:.2f} dB, accuracy "
            f"{r.get('accuracy', math.nan):.3f}")
    if bar is not None:
        bar.close()
    native, glued = baselines.applicability(pipe), baselines.applicability(pipe, glue=True)
    not_applicable = {k: v for k, v in native.items() if v is not None}
    not_even_glued = {k: v for k, v in glued.items() if v is not None}
    verdicts = [v for axis in _axes(efficiency) for v in verdict(rows, axis)]
    return {"table": which, "n": n, "batch_size": batch_size, "reference_steps": reference_steps,
            "guidance_scale": guidance, "n_reference": n_reference, "dtype": str(dtype).removeprefix("torch."),
            "share": share, "efficiency": efficiency, "reference": reference,
            "profile": {"attention": run.profile.attention, "other": run.profile.other,
                        "projections": run.profile.projections},
            "rows": rows, "verdict": verdicts, "caches_not_applicable": not_applicable,
            "caches_not_applicable_with_glue": not_even_glued,
            "seconds": time.perf_counter() - t0}


# ====================================================================== rendering
AXES = {"total_flops": "total transformer FLOPs", "projected_time": "projected full-size time (model, η = 1)",
        "projected_time_kernels": "projected full-size time (model, today's kernels)"}


def _axes(efficiency: float) -> tuple[str, ...]:
    """The verdict's cost axes: the kernel-efficiency model only when it differs from the limit."""
    return tuple(AXES) if efficiency < 1.0 else ("total_flops", "projected_time")


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}%"


def _db(x) -> str:
    if x is None:
        return "—"
    return "∞" if math.isinf(x) else f"{x:.2f}"


def markdown_verdict(result: dict, axis: str) -> str:
    head = ["cost ≤", "dense, fewer steps", "diffusers cache", "static window", "oracle top-k", "best ditaccel",
            "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in result["verdict"]:
        if v["axis"] != axis:
            continue

        def cell(k):
            return "—" if v[k] is None else f"{v[k]} ({_db(v[f'{k}_psnr'])} dB)"

        if v["winner"] == "none":
            word = "no ditaccel setting this cheap"
        elif v["margin"] is None:
            word = "ditaccel (no baseline this cheap)"
        else:
            word = (f"**ditaccel** by {v['margin']:.2f} dB" if v["winner"] == "ditaccel"
                    else f"baseline by {-v['margin']:.2f} dB")
        lines.append(f"| {100 * v['level']:.0f}% | " + " | ".join(cell(k) for k in ("dense", "cache", "window",
                                                                                      "oracle", "ditaccel"))
                     + f" | {word} |")
    return "\n".join(lines)


def markdown_rows(result: dict) -> str:
    head = ["setting", "family", "steps", "total FLOPs", "attn FLOPs", "projected time η=1",
            "projected time today", "time", "PSNR dB",
            "PSNR min", "SSIM", "accuracy", "FD→data"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(result["rows"], key=lambda r: (r["family"], -r["total_flops"])):
        lines.append("| " + " | ".join([
            r["label"], r["family"], str(r["steps"]), _pct(r["total_flops"]), _pct(r["attention_flops"]),
            _pct(r["projected_time"]), _pct(r["projected_time_kernels"]), _pct(r["time"]), _db(r["psnr"]), _db(r["psnr_min"]), f"{r['ssim']:.3f}",
            _pct(r.get("accuracy")), "—" if r.get("fd_data") is None else f"{r['fd_data']:.3g}"]) + " |")
    return "\n".join(lines)


def plot_worth(result: dict, path) -> None:
    """PNG: PSNR against the reference vs total FLOPs (left) and vs projected full-size time
    (right), one colour per family, each family's Pareto front drawn as a step line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    families = list(dict.fromkeys(r["family"] for r in result["rows"]))
    for ax, axis in zip(axes, ("total_flops", "projected_time_kernels" if result["efficiency"] < 1
                                else "projected_time")):
        for fam in families:
            pts = sorted(((100 * r[axis], r["psnr"]) for r in result["rows"]
                          if r["family"] == fam and math.isfinite(r["psnr"])))
            if not pts:
                continue
            sc = ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, alpha=0.6, label=fam)
            front, best = [], -math.inf
            for x, y in pts:
                if y > best:
                    front.append((x, y))
                    best = y
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color=sc.get_facecolor()[0],
                    linewidth=1.2)
        ax.set_xlabel(f"{AXES[axis]} (% of dense, {result['reference_steps']} steps)")
        ax.set_ylabel(f"PSNR against dense {result['reference_steps']} steps (dB)")
        ax.axvspan(20, 60, color="grey", alpha=0.08)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['table']} testbed: quality vs cost ({result['n']} samples)", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def render_section(result: dict, env: dict, command: str, links: dict, toy: bool) -> str:
    ref = result["reference"]
    lines = [f"## Worth, {result['table']} testbed: every setting against dense {result['reference_steps']} steps "
             "(generated by `ditaccel worth`)", ""]
    if toy:
        lines += ["**Toy run**: toy sizes, to check the plumbing. Not a measurement.", ""]
    lines += [
        f"{env['device']}, torch {env['torch']}, {result['dtype']}, {env['date']}. {result['n']} samples (seeds "
        f"0..{result['n'] - 1}), guidance {result['guidance_scale']:g}, batch {result['batch_size']}. Reference: "
        f"dense {result['reference_steps']} steps, {ref['time_s']:.2f} s, accuracy {_pct(ref.get('accuracy'))}, "
        f"FD to data {ref.get('fd_data', math.nan):.3g}. One sample's dense transformer call: attention "
        f"{result['profile']['attention'] / 1e9:.3g} GFLOP, everything else {result['profile']['other'] / 1e9:.3g} "
        "GFLOP.",
        f"Reproduce: `{command}`. Raw: `{links['json']}`.", "",
        f"**Projected full-size time is a model**, not a measurement: attention share of a dense step at full "
        f"size a = {result['share']:.3f}; time = (1 − a) · non-attention FLOPs + a · (dense-rate attention + "
        "compressed attention / η), as fractions of the reference; η = 1 is the hardware limit (compressed "
        f"attention at the dense kernel's rate), today's kernels η = {result['efficiency']:.2f}.", ""]
    for axis in _axes(result["efficiency"]):
        lines += [f"Best PSNR at each cost level, cost = {AXES[axis]}:", "", markdown_verdict(result, axis), ""]
    if result["caches_not_applicable"]:
        glued = result.get("caches_not_applicable_with_glue", {})
        lines += ["diffusers caches that do not apply to this model through diffusers' own API: " + "; ".join(
            f"{k} ({v})" for k, v in result["caches_not_applicable"].items()) + ". The rows labelled `[glue]` "
            "run them through `ditaccel.baselines`' glue hook (ours, not diffusers' support)"
            + ("; still not applicable with it: " + "; ".join(f"{k} ({v})" for k, v in glued.items()) if glued
               else "") + ".", ""]
    if "plot" in links:
        lines += [f"![PSNR against cost]({links['plot']})", ""]
    lines += ["<details><summary>Every setting</summary>", "", markdown_rows(result), "", "</details>"]
    return "\n".join(lines)


# ====================================================================== the command
#: run sizes (``toy``: CPU smoke runs of the plumbing)
FULL_SIZE = dict(samples_image=64, samples_video=32, reference_steps=50, batch_size=32, n_reference=512)
TOY_SIZE = dict(samples_image=2, samples_video=2, reference_steps=4, batch_size=2, n_reference=4)
TOY_SETTINGS = {
    "image": dict(dense_steps=(4, 2), method_steps=(4,), thresholds=("D2",), kept=(0.5,), mask_steps=(4,),
                  sparsities=(0.5,)),
    "video": dict(dense_steps=(4, 2), method_steps=(4,), sparsities=(0.5,), kept=(0.5,), mask_steps=(4,),
                  option_sparsities=(0.5,), option_steps=(4,), caches=False),  # the toy video model has 1 block
}
#: attention share of a dense step at full size when none is given (DESIGN.md §5's figures; the
#: command line should pass the measured ones from `ditaccel bench all --only attention-share`)
DEFAULT_SHARE = {"image": 0.75, "video": 0.85}


def _command(which, *, weights_dir, device, dtype, n, batch_size, reference_steps, share, efficiency, toy) -> str:
    parts = ["ditaccel worth --only", which, f"--samples-{which}", str(n), "--reference-steps", str(reference_steps),
             "--batch-size", str(batch_size), "--device", device, "--dtype", dtype,
             f"--attention-share-{which}", f"{share:g}", "--efficiency", f"{efficiency:g}"]
    if weights_dir is not None:
        parts += ["--weights", os.fspath(weights_dir)]
    if toy:
        parts.append("--toy")
    return " ".join(parts)


def run_worth(only: str | None = None, *, weights_dir=None, device: str | None = None, dtype: str | None = None,
              samples_image: int | None = None, samples_video: int | None = None,
              reference_steps: int | None = None, batch_size: int | None = None, share_image: float | None = None,
              share_video: float | None = None, efficiency: float = 1.0, out_md: str | None = None,
              results_dir: str | None = None, toy: bool = False, log=print, progress=None) -> dict[str, dict]:
    """Run the worth comparison on the selected testbeds; write QUALITY.md sections, raw JSON and
    Pareto plots (``docs/results/<date>-<device>-worth-<testbed>{.json,.png}``). Everything is checked
    before any model is loaded. ``log``: called with each progress line; ``progress``: a
    ``tqdm``-like factory for a bar over each testbed's rows (default: none)."""
    tables = ("image", "video") if only is None else (only,)
    if any(t not in ("image", "video") for t in tables):
        raise ValueError(f"--only: expected 'image' or 'video', got {only!r}")
    size = dict(TOY_SIZE if toy else FULL_SIZE)
    for key, value in (("samples_image", samples_image), ("samples_video", samples_video),
                       ("reference_steps", reference_steps), ("batch_size", batch_size)):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{key.replace('_', '-')}: must be a positive integer, got {value!r}")
            size[key] = value
    for which in tables:
        if size[f"samples_{which}"] < 2:
            raise ValueError(f"--samples-{which}: the Fréchet distance needs at least 2 samples, got "
                             f"{size[f'samples_{which}']}")
    shares = {"image": share_image, "video": share_video}
    for which, value in shares.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"--attention-share-{which}: must be in [0, 1], got {value!r}")
        shares[which] = DEFAULT_SHARE[which] if value is None else float(value)
    if not isinstance(efficiency, (int, float)) or not 0.0 < efficiency <= 1.0:
        raise ValueError(f"--efficiency: must be in (0, 1], got {efficiency!r}")
    root = check_weights(weights_dir, tables)
    device, dtype, out_md, results_dir = resolve_run(device, dtype, out_md, results_dir, toy, "worth")
    md_dir = os.path.dirname(os.path.abspath(out_md))
    no_plot = missing_matplotlib()
    results = {}
    for which in tables:
        n = size[f"samples_{which}"]
        result = run_table(which, weights_dir=root, device=device, dtype=TOOL_DTYPES[dtype], n=n,
                           batch_size=size["batch_size"], reference_steps=size["reference_steps"],
                           n_reference=size["n_reference"], share=shares[which], efficiency=efficiency,
                           settings_kwargs=TOY_SETTINGS[which] if toy else None, log=log, progress=progress)
        env = environment(device)
        stem = result_stem(results_dir, env, f"worth-{which}")
        files = {"json": stem + ".json"}
        if not no_plot:
            files["plot"] = stem + ".png"
            plot_worth(result, files["plot"])
        command = _command(which, weights_dir=weights_dir, device=device, dtype=dtype, n=n,
                           batch_size=size["batch_size"], reference_steps=size["reference_steps"],
                           share=shares[which], efficiency=efficiency, toy=toy)
        write_json(files["json"], jsonable({"command": command, "toy": toy, "environment": env,
                                             "weights": os.fspath(root), **result}))
        links = {k: os.path.relpath(os.path.abspath(f), md_dir) for k, f in files.items()}
        update_markdown(out_md, f"worth-{which}", render_section(result, env, command, links, toy))
        log(f"{which}: {len(result['rows'])} rows in {result['seconds']:.1f} s; wrote {out_md}, "
            f"{', '.join(files.values())}")
        results[which] = result
    return results


DESCRIPTION = ("Each method against what a user would do instead at equal cost: dense with fewer steps, diffusers' "
               "caches, a static window, an oracle mask; DiTFastAttn and AdaSpa at several step counts; all against "
               "the dense sample of the same seed at --reference-steps. Writes QUALITY.md sections, raw JSON and "
               "Pareto plots.")


def add_arguments(p) -> None:
    """``ditaccel worth``'s options, on ``p`` (its parser in the ``ditaccel.cli`` tree)."""
    p.add_argument("--only", choices=["image", "video"], help="one testbed (default: both)")
    p.add_argument("--weights", help="folder with image/, video/ and the classifiers (default: shipped)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available; --toy: cpu)")
    p.add_argument("--dtype", choices=list(TOOL_DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--samples-image", type=positive_int, help=f"2 or more (default: {FULL_SIZE['samples_image']}; "
                   f"--toy {TOY_SIZE['samples_image']})")
    p.add_argument("--samples-video", type=positive_int, help=f"2 or more (default: {FULL_SIZE['samples_video']}; "
                   f"--toy {TOY_SIZE['samples_video']})")
    p.add_argument("--reference-steps", type=positive_int, help=f"steps of the dense reference (default: "
                   f"{FULL_SIZE['reference_steps']}; --toy {TOY_SIZE['reference_steps']})")
    p.add_argument("--batch-size", type=positive_int, help=f"samples per pipeline call (default: "
                   f"{FULL_SIZE['batch_size']}; --toy {TOY_SIZE['batch_size']})")
    p.add_argument("--attention-share-image", type=float_in(0.0, 1.0), help="attention share of a dense PixArt-Sigma "
                   "2K step (measure: `ditaccel bench all --only attention-share-pixart-sigma-2k`; default: "
                   f"{DEFAULT_SHARE['image']})")
    p.add_argument("--attention-share-video", type=float_in(0.0, 1.0), help="attention share of a dense HunyuanVideo "
                   f"720p step (default: {DEFAULT_SHARE['video']})")
    p.add_argument("--efficiency", type=float_in(0.0, 1.0, low_open=True), default=1.0,
                   help="today's compressed attention's rate relative to the dense kernel's (η), for the second time "
                   "model (1: only the hardware limit); measure it with `ditaccel bench sparsity` (effective over "
                   "dense TFLOP/s)")
    p.add_argument("--out-md", help="the Markdown file to update (default: QUALITY.md; --toy: a temporary file)")
    p.add_argument("--results-dir", help="where JSON and PNGs go (default: docs/results; --toy: next to --out-md)")
    p.add_argument("--toy", action="store_true", help="toy sizes on the CPU, to check the plumbing")


def run(args) -> int:
    """``ditaccel worth`` (parsed by ``add_arguments``): 0 on success; bad arguments raise
    ``ValueError`` before any model is loaded."""
    check_run_args(args)
    run_worth(args.only, weights_dir=args.weights, device=args.device, dtype=args.dtype,
              samples_image=args.samples_image, samples_video=args.samples_video,
              reference_steps=args.reference_steps, batch_size=args.batch_size,
              share_image=args.attention_share_image, share_video=args.attention_share_video,
              efficiency=args.efficiency, out_md=args.out_md, results_dir=args.results_dir, toy=args.toy,
              log=printer(args), progress=progress_bar(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditaccel worth [options]`` (the same parser and errors): 0 on success, 2 on bad arguments."""

    return tool_main("worth", add_arguments, argv, description=DESCRIPTION, progress=True, func=run)


if __name__ == "__main__":
    sys.exit(main())
