"""ditaccel: training-free attention compression for diffusers Diffusion Transformers.

    plan = ditaccel.calibrate(pipe, ditaccel.DiTFastAttnConfig(threshold=0.1), num_inference_steps=20, ...)
    plan.save("plan.json")
    ditaccel.apply(pipe, plan)
    image = pipe(...).images[0]
    print(ditaccel.stats(pipe))
    ditaccel.remove(pipe)

The package root is the core (this API, runtime, processors, parallel, plan, calibrate, methods/,
kernels/, models/); the tools beside it (cli, bench/, evaluate, quality, worth, baselines, viz,
testbed/) import the core and never the other way round (tests/test_layering.py).
"""

from __future__ import annotations

import os

from ._version import __version__
from .calibrate import calibrate
from .methods.adaspa import AdaSpa, AdaSpaConfig
from .methods.adaspa import PLAN_ENTRIES
from .methods.ditfastattn import PRESETS, DiTFastAttn, DiTFastAttnConfig
from .methods.mixed import MixedPlan
from .models import adapter_for
from .plan import Plan, PlanError
from .processors import CALL_KINDS
from .runtime import Stats, install, remove, reset, split_target, stats


def apply(pipe_or_transformer, plan_or_config, *, cfg: bool | None = None,
          num_inference_steps: int | None = None) -> None:
    """Make ``pipe_or_transformer`` (a diffusers pipeline or its transformer) use a method.

    Args:
        pipe_or_transformer: the pipeline (preferred: its scheduler tells ditaccel where each
            generation starts) or a bare transformer.
        plan_or_config: a DiTFastAttn ``Plan`` (or the path of a plan file) from ``calibrate``,
            a mixed plan (format 2: DiTFastAttn's and AdaSpa's entries per layer and step), or an
            ``AdaSpaConfig`` (no calibration: AdaSpa searches online).
        cfg: override the per-call detection of batched classifier-free guidance.
        num_inference_steps: AdaSpa on a bare transformer: the step count its schedule is for
            (a pipeline's scheduler tells it at every generation).
    Nothing is changed if this raises.
    """
    plan = plan_or_config
    if isinstance(plan, AdaSpaConfig):
        pipe, _ = split_target(pipe_or_transformer)
        method = AdaSpa(plan)
        if num_inference_steps is not None:
            method.check_num_steps(num_inference_steps)
        elif pipe is None:
            raise ValueError("num_inference_steps: AdaSpa on a bare transformer needs the step count, "
                             "e.g. ditaccel.apply(transformer, AdaSpaConfig(), num_inference_steps=50)")
        install(pipe_or_transformer, method, cfg=cfg)
        return
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    if isinstance(plan, DiTFastAttnConfig):
        raise TypeError("plan_or_config: DiTFastAttn needs a calibrated Plan; run "
                        "plan = ditaccel.calibrate(pipe, config, num_inference_steps=..., ...) and apply(pipe, plan)")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan_or_config must be a Plan or a plan file path, got {type(plan).__name__}")
    _, transformer = split_target(pipe_or_transformer)
    plan.check_model(transformer)
    kind = adapter_for(transformer).attention_call
    # AdaSpa's entries run through ``core`` (every call kind has it), like AdaSpa itself
    unsupported = sorted(m for m, c in plan.counts().items()
                         if c and m not in CALL_KINDS[kind].methods and m not in PLAN_ENTRIES)
    if unsupported:
        raise ValueError(f"plan_or_config: methods {unsupported} are not supported for {type(transformer).__name__} "
                         f"yet (its attention convention {kind!r} runs {sorted(CALL_KINDS[kind].methods)})")
    args = (plan.methods, plan.metadata["window"], plan.metadata["window_size"],
            plan.metadata.get("residual_refresh", "full"))
    cache_dtype = plan.metadata.get("cache_dtype", "model")
    method = (MixedPlan(*args, adaspa=plan.adaspa_config(), cache_dtype=cache_dtype) if plan.is_mixed
              else DiTFastAttn(*args, cache_dtype=cache_dtype))
    method.expected_grid = plan.metadata.get("grid")
    install(pipe_or_transformer, method, cfg=cfg)


__all__ = ["PRESETS", "AdaSpaConfig", "DiTFastAttnConfig", "Plan", "PlanError", "Stats", "apply", "calibrate", "remove", "reset",
           "stats", "__version__"]
