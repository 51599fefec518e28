"""diffusers' own caches as baselines, and a FLOP counter for any generation.

What a user would do instead of ditaccel: run fewer steps, or switch on one of diffusers' caches
(``pipe.transformer.enable_cache(config)``). This module gives the cache side of that
comparison (``ditaccel.worth``): which caches apply to a pipeline and why the others do not
(``applicability``), a few settings per cache from light to aggressive (``cache_settings``),
switching them on and off through diffusers' API (``enable`` / ``disable``), and the measured
cost of a generation (``measure_flops``).

Found by trying each cache on the two testbeds (diffusers 0.42):

* CogVideoX (``CogVideoXTransformer3DModel`` is a ``CacheMixin``; the pipeline enters
  ``cache_context("cond_uncond")`` and sets ``current_timestep``): all five apply. TaylorSeer's
  default identifiers (``^transformer_blocks.*attn``, full match) match no module here (the
  attention is ``attn1``): with the defaults it hooks nothing and is a silent no-op, so our
  settings pass ``cache_identifiers`` for ``attn1`` and ``ff`` (a documented config field).
* DiT (``DiTTransformer2DModel`` is not a ``CacheMixin``): none applies, ``enable_cache`` does not
  exist. Calling diffusers' ``apply_*`` functions directly, FirstBlockCache and TaylorSeer then
  fail (``DiTPipeline`` never enters ``cache_context``), PAB has no timestep to read and keeps its
  state across generations (nothing resets it), and FasterCache assumes the CFG batch is
  [uncond, cond] and that ``hidden_states`` comes as a keyword, neither true for ``DiTPipeline``.
  ``glue=True`` (ours, not diffusers' support) adds one root hook that supplies what the pipeline
  lacks (the cache context, the current timestep, a state reset per generation) so that
  FirstBlockCache, TaylorSeer, MagCache and PAB run on DiT through ``diffusers.hooks.apply_*``.

MagCache needs ``mag_ratios`` (checkpoint- and schedule-dependent): ``calibrate_mag_ratios`` runs
diffusers' calibration mode once on calibration inputs (seed ``CALIBRATION_SEED``, not an
evaluation seed) at the evaluation's step count. ``MagCacheConfig.num_inference_steps`` must be
the pipeline's step count: the tail hook counts steps and resets its state when it reaches it,
and ``retention_ratio`` is taken of it; ratios of another length are interpolated to it by
diffusers (nearest neighbour, ``mag_cache.nearest_interp``), which is only an approximation since
the per-step ratio depends on the step size, so we calibrate at the exact step count.

``applicability`` is what we established on DiT and CogVideoX; for other pipelines it makes the
same structural checks (``enable_cache``, registered block classes, ``cache_context`` in the
pipeline's ``__call__``, ``current_timestep``, the DiT family's CFG order) and may be wrong.

Costs are measured, not assumed: ``measure_flops`` runs the generation under
``torch.utils.flop_counter.FlopCounterMode``. Its registry has SDPA formulas for the CUDA
kernels (``_scaled_dot_product_{flash,efficient,cudnn}_attention`` and the ``_flash`` /
``_efficient_attention_forward`` ops) but none for the CPU kernel
(``_scaled_dot_product_flash_attention_for_cpu``), which it counts as 0; we add that one with
torch's own SDPA formula (``custom_mapping``). It counts matmul-class ops only (mm, addmm, bmm,
baddbmm, convolution, SDPA; 2 FLOPs per multiply-add): norms, activations, softmax outside SDPA
and FasterCache's FFTs are not counted.
"""

from __future__ import annotations

import contextlib
import io
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .testbed.data import VideoCaptions
from .testbed.pixel import PixelCogVideoXPipeline

__all__ = [
    "CACHE_NAMES",
    "CALIBRATION_SEED",
    "CacheSetting",
    "applicability",
    "cache_settings",
    "calibrate_mag_ratios",
    "calibration_kwargs",
    "disable",
    "enable",
    "enabled_setting",
    "make_setting",
    "measure_flops",
]

CACHE_NAMES: tuple[str, ...] = (
    "FirstBlockCache",
    "TaylorSeer",
    "MagCache",
    "PyramidAttentionBroadcast",
    "FasterCache",
)

#: Generator seed of MagCache's calibration run (the evaluation seeds of ``ditaccel.worth`` /
#: ``ditaccel.evaluate`` are 0..n-1, 10_007 and 1_000_003).
CALIBRATION_SEED = 20_011

_GLUE_HOOK = "ditaccel_cache_glue"

# The knobs each cache's settings may set (our names -> the diffusers config field).
_PARAMS: dict[str, tuple[str, ...]] = {
    "FirstBlockCache": ("threshold",),
    "TaylorSeer": ("cache_interval", "disable_cache_before_step", "max_order"),
    "MagCache": ("threshold", "max_skip_steps", "retention_ratio"),
    "PyramidAttentionBroadcast": ("block_skip_range", "timestep_skip_range"),
    "FasterCache": ("attention_block_skip_range", "attention_timestep_skip_range", "uncond_skip_range",
                    "uncond_timestep_skip_range"),
}

# TaylorSeer: the attention and feed-forward outputs of every block (the paper's feature caching).
# diffusers' default identifiers (`^transformer_blocks.*attn`) match no module of DiT or CogVideoX.
_TAYLORSEER_IDENTIFIERS = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


# ====================================================================== settings
@dataclass(frozen=True)
class CacheSetting:
    """One cache at one strength, for one step count.

    Attributes:
        name: one of ``CACHE_NAMES``.
        label: e.g. ``"FirstBlockCache t=0.1"`` (``" [glue]"`` appended when it needs our glue).
        num_inference_steps: the step count the setting is for (MagCache's ratios and step
            counter depend on it; the others ignore it).
        params: the strength knobs as ``(key, value)`` pairs (``kwargs`` gives a dict).
        glue: whether ``enable`` needs our glue hook (DiT), not diffusers' ``enable_cache``.
        mag_ratios: MagCache only: calibrated ratios, one per step; ``None`` = calibrate on the
            first ``enable`` (``calibrate_mag_ratios`` with ``calibration_kwargs(pipe)``,
            memoised per transformer and step count).
        call_kwargs: extra pipeline arguments of the calibration run (e.g. ``guidance_scale``:
            use the evaluation's).
    """

    name: str
    label: str
    num_inference_steps: int
    params: tuple[tuple[str, Any], ...] = ()
    glue: bool = False
    mag_ratios: tuple[float, ...] | None = None
    call_kwargs: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def config(self, pipe, *, current_timestep: Callable[[], Any] | None = None):
        """A fresh diffusers config for ``pipe`` (``current_timestep``: the PAB / FasterCache
        callback; default ``lambda: pipe.current_timestep``)."""
        return _build_config(self, pipe, current_timestep)


def make_setting(name: str, num_inference_steps: int, *, glue: bool = False, label: str | None = None,
                 mag_ratios=None, call_kwargs: dict | None = None, **params) -> CacheSetting:
    """A ``CacheSetting`` from keyword knobs, validated (``ValueError`` naming the parameter).

    Knobs per cache (our names): FirstBlockCache ``threshold``; TaylorSeer ``cache_interval``,
    ``disable_cache_before_step``, ``max_order``; MagCache ``threshold``, ``max_skip_steps``,
    ``retention_ratio``; PyramidAttentionBroadcast ``block_skip_range``,
    ``timestep_skip_range``; FasterCache ``attention_block_skip_range``,
    ``attention_timestep_skip_range``, ``uncond_skip_range``, ``uncond_timestep_skip_range``.
    """
    if name not in CACHE_NAMES:
        raise ValueError(f"name: unknown cache {name!r}; expected one of {', '.join(CACHE_NAMES)}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
    for key in params:
        if key not in _PARAMS[name]:
            raise ValueError(f"{key}: not a {name} parameter; expected one of {', '.join(_PARAMS[name])}")
    _check_params(name, params, num_inference_steps)
    if mag_ratios is not None:
        if name != "MagCache":
            raise ValueError(f"mag_ratios: only MagCache takes mag_ratios, not {name}")
        mag_ratios = tuple(float(r) for r in mag_ratios)
        if not mag_ratios or not all(math.isfinite(r) and r > 0 for r in mag_ratios):
            raise ValueError(f"mag_ratios: expected positive finite ratios, got {mag_ratios}")
    if label is None:
        label = _label(name, params)
    if glue and not label.endswith("[glue]"):
        label += " [glue]"
    return CacheSetting(name, label, num_inference_steps, tuple(params.items()), glue, mag_ratios,
                        tuple((call_kwargs or {}).items()))


def _label(name: str, p: dict) -> str:
    def rng(r):
        return f"{r[0]:g}-{r[1]:g}"

    if name == "FirstBlockCache":
        return f"FirstBlockCache t={p.get('threshold', 0.05):g}"
    if name == "TaylorSeer":
        return (f"TaylorSeer N={p.get('cache_interval', 5)} warm-up={p.get('disable_cache_before_step', 3)}"
                f" order={p.get('max_order', 1)}")
    if name == "MagCache":
        return (f"MagCache t={p.get('threshold', 0.06):g} K={p.get('max_skip_steps', 3)}"
                f" r={p.get('retention_ratio', 0.2):g}")
    if name == "PyramidAttentionBroadcast":
        return f"PAB every {p.get('block_skip_range', 2)} t={rng(p.get('timestep_skip_range', (100, 800)))}"
    return (f"FasterCache attn every {p.get('attention_block_skip_range', 2)}"
            f" t={rng(p.get('attention_timestep_skip_range', (-1, 681)))}, uncond every"
            f" {p.get('uncond_skip_range', 5)} t={rng(p.get('uncond_timestep_skip_range', (-1, 641)))}")


def _check_params(name: str, p: dict, steps: int) -> None:
    def pos_int(key, minimum=1):
        if key in p and (not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < minimum):
            raise ValueError(f"{key}: expected an int >= {minimum}, got {p[key]!r}")

    def frac(key, lo=0.0, hi=None):
        if key in p:
            v = p[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < lo or (
                    hi is not None and v > hi):
                raise ValueError(f"{key}: expected a number in [{lo}, {hi if hi is not None else 'inf'}), got {v!r}")

    def pair(key):
        if key in p:
            v = p[key]
            if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
                    and v[0] < v[1]):
                raise ValueError(f"{key}: expected a (low, high) timestep pair with low < high, got {v!r}")
            p[key] = (v[0], v[1])

    if name in ("FirstBlockCache", "MagCache"):
        frac("threshold")
    if name == "TaylorSeer":
        pos_int("cache_interval")
        pos_int("disable_cache_before_step")
        pos_int("max_order")
    if name == "MagCache":
        pos_int("max_skip_steps")
        frac("retention_ratio", 0.0, 1.0)
    if name == "PyramidAttentionBroadcast":
        pos_int("block_skip_range", 2)
        pair("timestep_skip_range")
    if name == "FasterCache":
        pos_int("attention_block_skip_range", 2)
        pos_int("uncond_skip_range", 2)
        pair("attention_timestep_skip_range")
        pair("uncond_timestep_skip_range")


# Light -> aggressive, the same for every pipeline. Chosen on the trained testbeds at 50 steps
# (2 images / 1 video, CFG) to span about 20-80% of the dense transformer FLOPs; measured
# (image, glue) and exactly simulated from a recorded dense run (video: the schedule caches and
# MagCache are input-independent given their ratios; FirstBlockCache from the recorded
# first-block residuals), as % of dense FLOPs, image / video:
#   FirstBlockCache t = 0.05, 0.1, 0.2, 0.4:         63 / 75, 43 / 50, 32 / 35, ~25 / 27
#   TaylorSeer N = 2, 3, 4, 6 (warm-up 3 steps):     52 / 52, 38 / 38, 30 / 30, 22 / 22
#   MagCache (t, K) = (0.02, 1), (0.06, 3), (0.24, 6): 72 / 62, 48 / 42, 34 / 32
#   PAB every 2 (t 100-800), 2, 3, 6 (all t):        78 / 70, 68 / 57, 57 / 43, ~48 / 29
#   FasterCache (video only), see below:             63, 48, 29
# FirstBlockCache below t = 0.05 skipped nothing on the image testbed (t = 0.02: 100%).
_STRENGTHS: dict[str, list[dict[str, Any]]] = {
    "FirstBlockCache": [dict(threshold=0.05), dict(threshold=0.1), dict(threshold=0.2), dict(threshold=0.4)],
    "TaylorSeer": [dict(cache_interval=n, disable_cache_before_step=3) for n in (2, 3, 4, 6)],
    "MagCache": [dict(threshold=0.02, max_skip_steps=1), dict(threshold=0.06, max_skip_steps=3),
                 dict(threshold=0.24, max_skip_steps=6)],
    "PyramidAttentionBroadcast": [dict(block_skip_range=2, timestep_skip_range=(100, 800)),
                                  dict(block_skip_range=2, timestep_skip_range=(-1, 1000)),
                                  dict(block_skip_range=3, timestep_skip_range=(-1, 1000)),
                                  dict(block_skip_range=6, timestep_skip_range=(-1, 1000))],
    # light = diffusers' CogVideoX example; then wider timestep ranges; then every 3rd attention
    # and the unconditional branch once in 10 calls, at all timesteps
    "FasterCache": [dict(attention_block_skip_range=2, attention_timestep_skip_range=(-1, 681),
                         uncond_skip_range=5, uncond_timestep_skip_range=(-1, 641)),
                    dict(attention_block_skip_range=2, attention_timestep_skip_range=(-1, 901),
                         uncond_skip_range=5, uncond_timestep_skip_range=(-1, 901)),
                    dict(attention_block_skip_range=3, attention_timestep_skip_range=(-1, 1000),
                         uncond_skip_range=10, uncond_timestep_skip_range=(-1, 1000))],
}


def cache_settings(pipe, num_inference_steps: int, *, glue: bool = False, call_kwargs: dict | None = None,
                   mag_ratios=None) -> list[CacheSetting]:
    """The settings to compare: 3-4 strengths (light to aggressive) per cache that applies.

    Args:
        pipe: the pipeline (its transformer decides what applies, ``applicability``).
        num_inference_steps: the step count the settings are for.
        glue: also give the caches that apply only through our glue hook (DiT); their labels end
            in ``[glue]``.
        call_kwargs: pipeline arguments for MagCache's calibration run besides the inputs, the
            generator and the step count (e.g. ``{"guidance_scale": 4.0}``: use the evaluation's).
        mag_ratios: MagCache's ratios if already calibrated (any length: diffusers interpolates
            them to the step count, nearest neighbour); default: calibrate on first ``enable``.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
    apply = applicability(pipe, glue=glue)
    native = applicability(pipe)
    out = []
    for name in CACHE_NAMES:
        if apply[name] is not None:
            continue
        for params in _STRENGTHS[name]:
            extra = {}
            if name == "MagCache":
                extra = dict(mag_ratios=mag_ratios, call_kwargs=call_kwargs)
            out.append(make_setting(name, num_inference_steps, glue=native[name] is not None, **extra,
                                    **dict(params)))
    return out


# ====================================================================== applicability
def _transformer(pipe):
    t = getattr(pipe, "transformer", None)
    if t is None:
        raise ValueError("pipe: expected a pipeline with a .transformer")
    return t


def _blocks(transformer) -> list[torch.nn.Module]:
    blocks = []
    for name, sub in transformer.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(sub, torch.nn.ModuleList):
            blocks.extend(sub)
    return blocks


def _unregistered_block(transformer) -> str | None:
    for b in _blocks(transformer):
        try:
            TransformerBlockRegistry.get(type(b))
        except ValueError:
            return type(b).__name__
    return None


def _cfg_layout(pipe) -> str | None:
    """'cond,uncond' (DiT family), 'uncond,cond' (CogVideoX and most diffusers pipelines)."""
    from diffusers import DiTPipeline

    return "cond,uncond" if isinstance(pipe, DiTPipeline) else "uncond,cond"


def _enters_cache_context(pipe) -> bool:
    import inspect

    try:
        return "cache_context" in inspect.getsource(type(pipe).__call__)
    except (OSError, TypeError):
        return False


def applicability(pipe, *, glue: bool = False) -> dict[str, str | None]:
    """For each of ``CACHE_NAMES``: ``None`` if it applies to ``pipe``, else the reason (one line).

    ``glue=False``: through diffusers' own API (``pipe.transformer.enable_cache``) on the
    pipeline as it is. ``glue=True``: also through diffusers' ``apply_*`` functions plus our glue
    hook (cache context, current timestep, state reset) for a transformer without
    ``enable_cache`` — ours, not diffusers' support.
    """
    t = _transformer(pipe)
    cls = type(t).__name__
    pipe_cls = type(pipe).__name__
    out: dict[str, str | None] = {}
    mixin = hasattr(t, "enable_cache")
    unreg = _unregistered_block(t)
    no_blocks = not _blocks(t)
    ctx = _enters_cache_context(pipe)
    has_t = hasattr(type(pipe), "current_timestep")  # a property: on an instance it raises before a call
    no_mixin = f"{cls} has no enable_cache (not a diffusers CacheMixin)"
    for name in CACHE_NAMES:
        reason = None
        if name in ("FirstBlockCache", "MagCache") and no_blocks:
            reason = f"{cls} has no transformer_blocks/blocks ModuleList for the block hooks"
        elif name in ("FirstBlockCache", "MagCache") and unreg:
            reason = f"block class {unreg} is not in diffusers' TransformerBlockRegistry"
        elif name == "FasterCache" and _cfg_layout(pipe) != "uncond,cond":
            reason = (f"{pipe_cls} batches CFG as [cond, uncond] and passes hidden_states positionally; "
                      "FasterCache assumes [uncond, cond] passed as keywords (it would swap the branches)")
        elif not mixin and not glue:
            why = {
                "FirstBlockCache": f"apply_first_block_cache() then fails with 'No cache context is set' ({pipe_cls} "
                                   "never enters transformer.cache_context)",
                "TaylorSeer": f"apply_taylorseer_cache() then fails with 'No cache context is set' ({pipe_cls} never "
                              "enters transformer.cache_context)",
                "MagCache": f"apply_mag_cache() runs, but {pipe_cls} never resets hook state (no _reset_stateful_cache)",
                "PyramidAttentionBroadcast": f"{pipe_cls} has no current_timestep for the callback and never resets "
                                             "hook state between generations",
            }[name]
            reason = f"{no_mixin}; {why}"
        elif mixin and name in ("FirstBlockCache", "TaylorSeer") and not ctx and not glue:
            reason = f"{pipe_cls} never enters transformer.cache_context: 'No cache context is set'"
        elif mixin and name in ("PyramidAttentionBroadcast", "FasterCache") and not has_t and not glue:
            reason = f"{pipe_cls} has no current_timestep for current_timestep_callback"
        out[name] = reason
    return out


# ====================================================================== configs
def _build_config(s: CacheSetting, pipe, current_timestep=None):
    p = s.kwargs
    cb = current_timestep if current_timestep is not None else (lambda: pipe.current_timestep)
    if s.name == "FirstBlockCache":
        return FirstBlockCacheConfig(threshold=p.get("threshold", 0.05))
    if s.name == "TaylorSeer":
        return TaylorSeerCacheConfig(cache_interval=p.get("cache_interval", 5),
                                     disable_cache_before_step=p.get("disable_cache_before_step", 3),
                                     max_order=p.get("max_order", 1), taylor_factors_dtype=torch.float32,
                                     cache_identifiers=list(_TAYLORSEER_IDENTIFIERS))
    if s.name == "MagCache":
        ratios = s.mag_ratios
        if ratios is None:
            ratios = calibrate_mag_ratios(pipe, s.num_inference_steps, glue=s.glue, **dict(s.call_kwargs))
        return MagCacheConfig(threshold=p.get("threshold", 0.06), max_skip_steps=p.get("max_skip_steps", 3),
                              retention_ratio=p.get("retention_ratio", 0.2), num_inference_steps=s.num_inference_steps,
                              mag_ratios=torch.tensor(ratios, dtype=torch.float32))
    if s.name == "PyramidAttentionBroadcast":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=p.get("block_skip_range", 2),
                                               spatial_attention_timestep_skip_range=p.get("timestep_skip_range",
                                                                                           (100, 800)),
                                               current_timestep_callback=cb)
    # FasterCache: the CogVideoX example of diffusers' docs (weight 0.3, low-frequency update to
    # t = 641), tensor layout (B, F, C, H, W); 4-D latents (images) are BCHW.
    ndim = 5 if getattr(_transformer(pipe).config, "sample_frames", None) else 4
    return FasterCacheConfig(
        spatial_attention_block_skip_range=p.get("attention_block_skip_range", 2),
        spatial_attention_timestep_skip_range=p.get("attention_timestep_skip_range", (-1, 681)),
        unconditional_batch_skip_range=p.get("uncond_skip_range", 5),
        unconditional_batch_timestep_skip_range=p.get("uncond_timestep_skip_range", (-1, 641)),
        low_frequency_weight_update_timestep_range=(99, 641),
        high_frequency_weight_update_timestep_range=(-1, 301),
        spatial_attention_block_identifiers=["transformer_blocks"],
        attention_weight_callback=lambda _: 0.3,
        tensor_format="BFCHW" if ndim == 5 else "BCHW",
        current_timestep_callback=cb,
    )


# ====================================================================== glue (ours)
class _Glue(ModelHook):
    """Ours, for a transformer whose pipeline gives the caches nothing (DiT): around each call,
    sets the cache context ``"cond_uncond"`` on every stateful hook below, records the call's
    timestep (PAB's ``current_timestep_callback``), and resets the stateful hooks when a new
    generation starts (a timestep not below the previous call's)."""

    _is_stateful = False

    def __init__(self):
        super().__init__()
        self.current_timestep: float | None = None
        self._last: float | None = None

    def new_forward(self, module, *args, **kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise ValueError("cache glue: the transformer call has no timestep argument")
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if self._last is not None and t >= self._last:
            registry.reset_stateful_hooks(recurse=True)
        self._last = self.current_timestep = t
        _set_cache_context(module, CacheContext("cond_uncond"))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _set_cache_context(module, None)


_APPLY = {
    "FirstBlockCache": apply_first_block_cache,
    "TaylorSeer": apply_taylorseer_cache,
    "MagCache": apply_mag_cache,
    "PyramidAttentionBroadcast": apply_pyramid_attention_broadcast,
    "FasterCache": apply_faster_cache,
}


def _hook_names(name: str) -> tuple[str, ...]:
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    return {
        "FirstBlockCache": (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
        "TaylorSeer": (_TAYLORSEER_CACHE_HOOK,),
        "MagCache": (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK),
        "PyramidAttentionBroadcast": (_PYRAMID_ATTENTION_BROADCAST_HOOK,),
        "FasterCache": (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK),
    }[name]


# ====================================================================== enable / disable
_ENABLED: "weakref.WeakKeyDictionary[torch.nn.Module, CacheSetting]" = weakref.WeakKeyDictionary()


def enable(pipe, setting: CacheSetting) -> None:
    """Switch ``setting`` on: ``pipe.transformer.enable_cache(config)`` (diffusers' API), or for
    a ``[glue]`` setting diffusers' ``apply_*`` function plus our glue hook. One cache at a time.
    MagCache without ratios calibrates first (one dense generation, ``calibrate_mag_ratios``)."""
    if not isinstance(setting, CacheSetting):
        raise ValueError(f"setting: expected a CacheSetting, got {type(setting).__name__}")
    if setting.name not in CACHE_NAMES:
        raise ValueError(f"setting.name: unknown cache {setting.name!r}")
    t = _transformer(pipe)
    if t in _ENABLED:
        raise ValueError(f"setting: {_ENABLED[t].label!r} is already enabled on this transformer; disable(pipe) first")
    reason = applicability(pipe, glue=setting.glue)[setting.name]
    if reason is not None:
        raise ValueError(f"setting: {setting.name} does not apply to {type(pipe).__name__}: {reason}")
    if not setting.glue:
        t.enable_cache(setting.config(pipe))
    else:
        glue = _Glue()
        config = setting.config(pipe, current_timestep=lambda: glue.current_timestep)
        registry = HookRegistry.check_if_exists_or_initialize(t)
        _APPLY[setting.name](t, config)
        registry.register_hook(glue, _GLUE_HOOK)
        registry.invalidate_child_registries_cache()
    _ENABLED[t] = setting


def disable(pipe) -> None:
    """Switch off what ``enable`` switched on (``disable_cache()`` / removing the same hooks);
    a no-op when nothing is enabled. Outputs afterwards are bit-identical to the untouched
    pipeline's."""
    t = _transformer(pipe)
    setting = _ENABLED.pop(t, None)
    if setting is None:
        return
    if not setting.glue:
        t.disable_cache()
        return
    registry = HookRegistry.check_if_exists_or_initialize(t)
    registry.remove_hook(_GLUE_HOOK, recurse=False)
    for hook in _hook_names(setting.name):
        registry.remove_hook(hook, recurse=True)
    registry.invalidate_child_registries_cache()


def enabled_setting(pipe) -> CacheSetting | None:
    """The setting ``enable`` switched on for ``pipe.transformer``, if any."""
    return _ENABLED.get(_transformer(pipe))


# ====================================================================== MagCache calibration
_MAG_MEMO: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def calibration_kwargs(pipe, batch: int = 2) -> dict[str, Any]:
    """Inputs of a calibration run, distinct from the evaluation's: generator seed
    ``CALIBRATION_SEED``; image: class labels 0, 5, 10, ... (mod the class count); video:
    captions drawn with that seed; other pipelines: a fixed prompt."""
    from diffusers import DiTPipeline

    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    if isinstance(pipe, DiTPipeline):
        k = pipe.transformer.config.num_embeds_ada_norm or 1000
        return dict(class_labels=[(5 * i) % k for i in range(batch)], generator=gen)
    if isinstance(pipe, PixelCogVideoXPipeline):
        prompts = VideoCaptions.captions(VideoCaptions().balanced_labels(batch, CALIBRATION_SEED))
    else:
        prompts = ["a small boat drifting on a calm lake at dawn"] * batch
    return dict(prompt=prompts, generator=gen)


def calibrate_mag_ratios(pipe, num_inference_steps: int, *, glue: bool | None = None, inputs: dict | None = None,
                         **call_kwargs) -> tuple[float, ...]:
    """MagCache's ratios for ``pipe`` at ``num_inference_steps``, from one dense generation in
    diffusers' calibration mode (``MagCacheConfig(calibrate=True)``: nothing skipped; per step
    the mean over tokens of ||residual_t|| / ||residual_{t-1}||, the residual being the blocks'
    output minus input; the first step's ratio is 1.0).

    ``inputs``: the calibration inputs (default ``calibration_kwargs(pipe)``, distinct from the
    evaluation's); ``call_kwargs``: other pipeline arguments (guidance scale, size, ...).
    Memoised per transformer, step count and arguments. The ratios are read from the tail
    block's hook (diffusers only prints them and then clears them).
    """
    t = _transformer(pipe)
    if glue is None:
        glue = not hasattr(t, "enable_cache")
    inputs = calibration_kwargs(pipe) if inputs is None else dict(inputs)
    key = (num_inference_steps, repr(sorted((k, v) for k, v in {**inputs, **call_kwargs}.items()
                                            if k != "generator")),
           inputs["generator"].initial_seed() if isinstance(inputs.get("generator"), torch.Generator) else None)
    memo = _MAG_MEMO.setdefault(t, {})
    if key in memo:
        return memo[key]
    if t in _ENABLED:
        raise ValueError("pipe: disable the enabled cache before calibrating MagCache")
    config = MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps)
    registry = HookRegistry.check_if_exists_or_initialize(t)
    glue_hook = None
    if glue:
        apply_mag_cache(t, config)
        glue_hook = _Glue()
        registry.register_hook(glue_hook, _GLUE_HOOK)
        registry.invalidate_child_registries_cache()
    else:
        t.enable_cache(config)
    ratios: list[float] = []
    tail = None
    for b in _blocks(t):
        reg = getattr(b, "_diffusers_hook", None)
        hook = reg.get_hook(_hook_names("MagCache")[1]) if reg is not None else None
        if hook is not None and hook.is_tail:
            tail = hook
    if tail is None:  # pragma: no cover - diffusers changed
        raise RuntimeError("MagCache calibration: no tail block hook found")
    record = tail._perform_calibration_step

    def recording(state, residual):
        record(state, residual)
        ratios.append(float(state.calibration_ratios[-1]))

    tail._perform_calibration_step = recording
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # diffusers prints the ratios
            pipe(num_inference_steps=num_inference_steps, **inputs, **call_kwargs)
    finally:
        if glue:
            registry.remove_hook(_GLUE_HOOK, recurse=False)
            for hook in _hook_names("MagCache"):
                registry.remove_hook(hook, recurse=True)
            registry.invalidate_child_registries_cache()
        else:
            t.disable_cache()
    if len(ratios) != num_inference_steps:
        raise RuntimeError(f"MagCache calibration: expected {num_inference_steps} ratios, got {len(ratios)} "
                           "(one transformer call per step expected)")
    memo[key] = tuple(ratios)
    return memo[key]


# ====================================================================== FLOPs
_aten = torch.ops.aten


def _sdpa_raw(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


_sdpa_raw._get_raw = True  # FlopCounterMode: call with the tensors, not shape-wrapped

#: Ops counted as attention cores: the SDPA family (CUDA ones have torch's formulas; the CPU
#: kernel gets ours).
_ATTENTION_OPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu,
    _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention,
    _aten._flash_attention_forward,
    _aten._efficient_attention_forward,
}


def _first_child(block: torch.nn.Module) -> torch.nn.Module | None:
    return next(iter(block.children()), None)


def measure_flops(pipe, call_kwargs: dict) -> dict[str, Any]:
    """Run ``pipe(**call_kwargs)`` once and count what the transformer actually computed.

    Returns a dict:
        ``total_flops``: the transformer's FLOPs (``FlopCounterMode``; matmul-class ops and
        attention cores, the CPU SDPA kernel included); ``attention_flops``: its SDPA cores alone;
        ``pipeline_flops``: everything in the call (text encoder, VAE, ...);
        ``transformer_calls``: transformer forwards; ``block_calls``: transformer-block
        forwards whose body ran (counted on the block's first submodule, so a block a cache
        skipped is not counted); ``attention_calls``: SDPA cores that ran in the transformer;
        ``output``: the pipeline's return value.

    Works for a dense run and under any cache (or ditaccel method). Attention a method computes
    without SDPA (e.g. ditaccel's own kernels) is in ``total_flops`` only as far as it uses
    matmuls; use ``ditaccel.stats`` for those.
    """
    t = _transformer(pipe)
    calls = {"transformer": 0, "block": 0, "attention": 0}
    inside = [0]

    def counting(f):
        def g(*args, **kwargs):
            if inside[0]:
                calls["attention"] += 1
            return f(*args, **kwargs)

        g._get_raw = True
        return g

    from torch.utils.flop_counter import flop_registry

    mapping = {op: counting(_sdpa_raw if op is _aten._scaled_dot_product_flash_attention_for_cpu
                            else flop_registry[op]) for op in _ATTENTION_OPS}

    def pre(module, args, kwargs=None):
        calls["transformer"] += 1
        inside[0] += 1

    def post(module, args, output):
        inside[0] -= 1

    def block_pre(module, args):
        calls["block"] += 1

    handles = [t.register_forward_pre_hook(pre), t.register_forward_hook(post)]
    for b in _blocks(t):
        child = _first_child(b)
        if child is not None:
            handles.append(child.register_forward_pre_hook(block_pre))
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
            output = pipe(**call_kwargs)
    finally:
        for h in handles:
            h.remove()
    counts = fc.get_flop_counts()
    name = type(t).__name__
    per_op = counts.get(name, {})
    if not per_op and calls["transformer"]:
        raise RuntimeError(f"FlopCounterMode recorded nothing under {name!r}; modules seen: {sorted(counts)}")
    return {
        "total_flops": int(sum(per_op.values())),
        "attention_flops": int(sum(v for op, v in per_op.items() if op in _ATTENTION_OPS)),
        "pipeline_flops": int(fc.get_total_flops()),
        "transformer_calls": calls["transformer"],
        "block_calls": calls["block"],
        "attention_calls": calls["attention"],
        "output": output,
    }
