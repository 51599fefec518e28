"""Model cases of ``ditaccel bench``: full-size architectures with random weights (no downloads):
per-step time under a DiTFastAttn plan (``step``) or AdaSpa (``adaspa-step``), a 50-step PixArt
plan, HunyuanVideo 720p under AdaSpa, the attention share of a step, the calibration sweep on a
tiny model (``sweep``) and the time of calibration itself at full size (``bench_calibrate``)."""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import time

import ditaccel  # the public API
import numpy as np
import torch
from diffusers import (
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    HunyuanVideoTransformer3DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    WanTransformer3DModel,
)

from ..cli_support import call_params, pipeline_inputs, load_pipeline, psnr
from ..models import adapter_for
from ..plan import Plan
from ..runtime import install, remove
from ..testbed import random_prompt_embeds
from ..testbed.tiny import PIXART_SCHEDULER_CONFIG
from ..viz import to_uint8
from .harness import _cuda_time, _dtype_name, _meta, _peak, _peak_reset, dense_sdpa_context, trivial_masks_dropped
from .report import device_name

#: PixArt-Sigma-XL-2-2K-MS transformer architecture (diffusers config), random weights
PIXART_SIGMA_2K = dict(
    sample_size=256, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
    attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
    num_embeds_ada_norm=1000, upcast_attention=False, use_additional_conditions=False, interpolation_scale=None,
    dropout=0.0, attention_type="default", norm_num_groups=32,
)


#: DiT-XL-2-512 transformer architecture
DIT_XL_2_512 = dict(
    sample_size=64, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
    attention_head_dim=72, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", activation_fn="gelu-approximate",
    attention_bias=True, norm_elementwise_affine=False, upcast_attention=False,
)


MODELS = {"pixart-sigma-2k": PIXART_SIGMA_2K, "dit-xl-2-512": DIT_XL_2_512}


#: the hand-made plan's columns: one method per step for all layers
STEP_METHODS = ["full", "wars", "wars+asc", "asc", "ast", "full", "ast", "asc"]


#: toy sizes of the same architectures, for ``ditaccel bench all --dry-run`` on the CPU
TOY_PIXART = dict(sample_size=16, num_layers=1, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                  caption_channels=32)


TOY_WAN = dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=1,
               rope_max_seq_len=32)


#: Wan2.1-T2V-1.3B transformer architecture (diffusers config), random weights
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def build_transformer(model: str, device: str, dtype: torch.dtype, seed: int = 0, overrides: dict | None = None):
    """The random-weight transformer of ``MODELS[model]``, config entries replaced by ``overrides``
    (toy sizes for dry runs)."""
    cls = PixArtTransformer2DModel if model.startswith("pixart") else DiTTransformer2DModel
    torch.manual_seed(seed)
    with torch.device(device):
        tr = cls(**{**MODELS[model], **(overrides or {})})
    return tr.to(dtype).eval().requires_grad_(False)


def model_inputs(model: str, transformer, batch: int, device: str, dtype: torch.dtype):
    cfg = transformer.config
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device, dtype=dtype, generator=g)
    x = x.expand(batch, -1, -1, -1).contiguous()  # CFG: identical halves, as pipelines pass them
    if model.startswith("pixart"):
        ctx = torch.randn(batch, 300, cfg.caption_channels, device=device, dtype=dtype, generator=g)
        return {"hidden_states": x, "encoder_hidden_states": ctx,
                "encoder_attention_mask": torch.ones(batch, 300, device=device)}
    labels = torch.tensor([207] * (batch // 2) + [1000] * (batch - batch // 2), device=device)
    return {"hidden_states": x, "class_labels": labels}


def bench_step(model: str = "pixart-sigma-2k", device: str = "cuda", dtype=torch.bfloat16, batch: int = 2,
               repeats: int = 5, window: str = "band1d", overrides: dict | None = None) -> dict:
    """Per-step transformer time: dense vs. each DiTFastAttn method (a hand-made plan), median of
    ``repeats`` generations per step. ``overrides`` replaces config entries (toy sizes)."""
    tr = build_transformer(model, device, dtype, overrides=overrides)
    inputs = model_inputs(model, tr, batch, device, dtype)
    n_layers = len(tr.transformer_blocks)
    steps = len(STEP_METHODS)
    timesteps = torch.linspace(999, 1, steps).round()
    grid = tr.config.sample_size // tr.config.patch_size

    def generation():
        times = []
        for t in timesteps:
            ts = torch.full((batch,), float(t), device=device)
            times.append(_cuda_time(lambda: tr(timestep=ts, **inputs), device))
        return times

    results = {"model": model, "layers": n_layers, "tokens": grid * grid, "batch": batch,
               "heads": tr.config.num_attention_heads, "head_dim": tr.config.attention_head_dim,
               "dtype": _dtype_name(dtype), "device": device_name(device), "torch": torch.__version__,
               "window": window, "repeats": repeats, "date": datetime.date.today().isoformat()}
    with torch.no_grad(), dense_sdpa_context():
        generation()  # warm-up
        dense = [generation() for _ in range(repeats)]
        plan = Plan.from_methods(tr, [list(STEP_METHODS) for _ in range(n_layers)], cfg=True, window=window)
        ditaccel.apply(tr, plan)
        try:
            generation()  # warm-up (compiles the window kernel)
            fast = [generation() for _ in range(repeats)]
            st = ditaccel.stats(tr)
        finally:
            ditaccel.remove(tr)
    dense_step = statistics.median(x for run in dense for x in run)
    per_step = [statistics.median(run[s] for run in fast) for s in range(steps)]
    results.update(
        dense_step_ms=dense_step,
        steps=[{"step": s, "method": STEP_METHODS[s], "ms": per_step[s], "speedup": dense_step / per_step[s]}
               for s in range(steps)],
        plan_total_ms=sum(per_step), dense_total_ms=dense_step * steps,
        attention_flops_ratio=st.attention_flops_ratio, cache_bytes_peak=st.cache_bytes_peak,
    )
    return results


def bench_sweep(model: str = "tiny-dit", steps: int = 20, device: str = "cpu", thresholds=None,
                window: str = "band1d", search: str = "greedy") -> dict:
    """Calibrate at each threshold (default D1..D6) on a built-in offline model; report calibration
    time, attention-FLOPs ratio of a generation with the plan, and its PSNR against dense."""
    from ditaccel.methods.ditfastattn import PRESETS
    thresholds = thresholds or list(PRESETS)
    pipe = load_pipeline(model, device, torch.float32 if device == "cpu" else torch.bfloat16)
    is_dit = "class_labels" in call_params(pipe)
    calib = pipeline_inputs(pipe, None, None, 8 if is_dit else 6)  # the paper: 8 labels / 6 captions
    sample = pipeline_inputs(pipe, None, [3, 404] if is_dit else None, 2)
    if not is_dit:
        sample = {**pipeline_inputs(pipe, ["a small house by a lake", "two dogs playing in the snow"], None, 2)}
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in call_params(pipe) else {}

    def generate():
        g = torch.Generator(device).manual_seed(0)
        return to_uint8(pipe(num_inference_steps=steps, generator=g, output_type="np", **sample, **extra).images)

    dense = generate()
    rows = []
    for th in thresholds:
        cfg = ditaccel.DiTFastAttnConfig(threshold=th, window=window, search=search, show_progress=False)
        t0 = time.perf_counter()
        plan = ditaccel.calibrate(pipe, cfg, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(1),
                                  **calib, **extra)
        seconds = time.perf_counter() - t0
        ditaccel.apply(pipe, plan)
        try:
            img = generate()
            st = ditaccel.stats(pipe)
        finally:
            ditaccel.remove(pipe)
        rows.append({"threshold": th, "delta": cfg.threshold, "calibration_s": seconds,
                     "attention_flops_ratio": st.attention_flops_ratio, "plan_counts": plan.counts(),
                     "psnr_vs_dense": psnr(dense, img), "mean_abs_diff": float(np.abs(dense.astype(int) - img).mean())})
    tr = pipe.transformer
    return {"model": model, "class": type(tr).__name__, "layers": len(tr.transformer_blocks),
            "tokens": plan.metadata.get("tokens"), "steps": steps, "device": device, "window": window,
            "search": search, "torch_threads": torch.get_num_threads(),
            "calibration_inputs": len(next(iter(calib.values()))), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "rows": rows}


def pixart_pipeline(model: str, device: str, dtype: torch.dtype, overrides: dict | None = None) -> PixArtSigmaPipeline:
    """A PixArt-Σ pipeline around :func:`build_transformer`'s random-weight transformer, with the released
    model's scheduler (DPM-Solver++, 2nd order) and neither text encoder nor VAE: call it with
    ``prompt_embeds`` (:func:`ditaccel.testbed.random_prompt_embeds`) and ``output_type="latent"``."""
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None,
                               transformer=build_transformer(model, device, dtype, overrides=overrides),
                               scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _OutOfTime(Exception):
    """Raised by the step callback of a calibration whose time budget is spent."""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_calibrate(model: str = "pixart-sigma-2k", steps: int = 20, threshold: float | str = "D4",
                    searches=("local", "greedy"), prompts: int = 1, text_tokens: int = 300,
                    guidance_scale: float = 4.5, window: str = "band1d", greedy_budget_s: float | None = 240.0,
                    device: str = "cuda", dtype=torch.bfloat16, overrides: dict | None = None) -> dict:
    """The wall time of ``ditaccel.calibrate`` on the full-size PixArt-Σ 2K pipeline (random weights;
    2048 × 2048 → 256 × 256 latent → 16,384 tokens, 28 layers), each search in ``searches`` at one
    threshold, beside one dense generation of the same ``steps`` in the same run.

    The calibration inputs are ``prompts`` random T5 embeddings (``text_tokens`` × 4096, the mask
    keeping a random prefix; the negative prompt one token, as the empty prompt encodes) with CFG
    (batch 2 × ``prompts``), so no text encoder is needed, and ``output_type="latent"``, so no VAE
    runs (dense generation likewise: the denoising loop alone). A 2-step dense generation and a
    2-step ``local`` calibration run first (cuDNN and the window kernels warm up and autotune).
    Each found plan then generates once (its attention FLOPs from ``ditaccel.stats``, its time).

    Forward passes of the transformer (one pass: the CFG batch), from ``calibrate.py``, with n = 28
    layers, c = 4 candidates, S steps:

    * dense generation: S.
    * ``local``: step 0: 2 (the all-``full`` reference, the written column); every later step: the
      reference, which also scores each candidate on each layer's own output (about 0.9 of a layer's
      attention more: ``asc`` on half the batch and two window passes), a binary search over at
      most n·c = 112 distinct scores (at most 7 passes), and the written column: at most
      2 + 9 (S − 1) = 173 passes at S = 20: about 9× a dense generation (the scoring adds about
      0.65 of a pass per step, the compressed trial columns cost less than a dense pass).
    * ``greedy`` (the paper's): step 0: 2; every later step: the reference, n to n·c trials (each
      layer tries candidates until one is within budget) and the written column:
      2 + (S − 1)(n + 2) … 2 + (S − 1)(n·c + 2) = 572 … 2,168 passes at S = 20: 29–108× a dense
      generation, each trial a little cheaper than a dense pass (its first layers compress).

    At about 0.3 s per dense pass on an H200: dense ≈ 6 s, ``local`` ≈ 1 min, ``greedy`` 2–11 min.
    So that the case fits in one 10-minute command, ``greedy`` stops after the first step that ends
    past ``greedy_budget_s`` seconds (None: never; at least 2 steps decided, so it overruns by at most
    one step, ≤ 114 passes ≈ 35 s); the result then says how many of the ``steps`` it decided and
    estimates the whole search as its time plus the mean time of its steps after step 0 for each step
    left (its plan is not written, so its plan columns stay empty).
    ``overrides`` replaces transformer config entries (toy sizes for dry runs)."""
    pipe = pixart_pipeline(model, device, dtype, overrides)
    tr = pipe.transformer
    n_layers = len(adapter_for(tr).attention_modules(tr))
    model_bytes = _peak_reset(device)
    emb, mask, neg, neg_mask = random_prompt_embeds(pipe, batch=prompts, seq_len=text_tokens)
    side = tr.config.sample_size * pipe.vae_scale_factor
    call = dict(prompt=None, negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask,
                negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask, guidance_scale=guidance_scale,
                height=side, width=side, use_resolution_binning=False, output_type="latent")
    passes = [0]  # transformer passes: the first block runs once in every pass, whatever the plan
    counter = tr.transformer_blocks[0].register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))

    def config(search):
        return ditaccel.DiTFastAttnConfig(threshold=threshold, window=window, search=search, show_progress=False)

    def generate(n):
        passes[0] = 0
        _sync(device)
        t0 = time.perf_counter()
        pipe(num_inference_steps=n, generator=torch.Generator(device).manual_seed(1), **call)
        _sync(device)
        return time.perf_counter() - t0

    def calibrate(search, n, budget=None):
        marks = []  # seconds from the start (t0, below) at the end of each decided step

        def on_step(i, t, latents):
            _sync(device)
            marks.append(time.perf_counter() - t0)
            if budget is not None and 2 <= len(marks) < n and marks[-1] > budget:
                raise _OutOfTime

        passes[0] = 0
        _sync(device)
        t0 = time.perf_counter()
        try:
            plan = ditaccel.calibrate(pipe, config(search), num_inference_steps=n,
                                      generator=torch.Generator(device).manual_seed(1), callback=on_step, **call)
        except _OutOfTime:
            plan = None
        _sync(device)
        return plan, time.perf_counter() - t0, marks

    cfg = config("local")
    res = {"model": model, "layers": n_layers, "heads": tr.config.num_attention_heads,
           "head_dim": tr.config.attention_head_dim, "image": [side, side],
           "latent": [tr.config.sample_size] * 2, "tokens": (tr.config.sample_size // tr.config.patch_size) ** 2,
           "prompts": prompts, "batch": 2 * prompts, "text_tokens": text_tokens, "guidance_scale": guidance_scale,
           "steps": steps, "scheduler": type(pipe.scheduler).__name__, "threshold": threshold,
           "delta": cfg.threshold, "window": window, "window_size": cfg.window_size,
           "greedy_budget_s": greedy_budget_s, "model_bytes": model_bytes, **_meta(device, dtype)}
    try:
        with torch.no_grad(), dense_sdpa_context():
            generate(min(2, steps))  # warm-up: cuDNN
            calibrate("local", min(2, steps))  # warm-up: the window kernels (compile, autotune)
            _peak_reset(device)
            dense_s = generate(steps)
            res["dense"] = {"seconds": dense_s, "passes": passes[0], "pass_seconds": dense_s / passes[0],
                            "peak_bytes": _peak(device, 0)}
            res["searches"] = []
            for search in searches:
                _peak_reset(device)
                plan, seconds, marks = calibrate(search, steps, greedy_budget_s if search == "greedy" else None)
                step_s = [b - a for a, b in zip([0.0, *marks], marks)]
                done = len(marks)
                row = {"search": search, "completed": plan is not None, "steps_decided": done, "seconds": seconds,
                       "step_seconds": step_s, "passes": passes[0], "passes_per_step": passes[0] / max(done, 1),
                       "peak_bytes": _peak(device, 0)}
                row["estimated_seconds"] = seconds if plan is not None else (
                    seconds + statistics.mean(step_s[1:]) * (steps - done))
                row["vs_dense"] = row["estimated_seconds"] / dense_s
                if plan is not None:
                    ditaccel.apply(pipe, plan)
                    try:
                        plan_s = generate(steps)
                        st = ditaccel.stats(pipe)
                    finally:
                        ditaccel.remove(pipe)
                    row.update(attention_flops_ratio=st.attention_flops_ratio, plan_counts=plan.counts(),
                               plan_seconds=plan_s, plan_speedup=dense_s / plan_s,
                               max_step_loss=max(plan.metadata["step_loss"]))
                res["searches"].append(row)
    finally:
        counter.remove()
    return res


def bench_adaspa_step(frames: int = 21, height: int = 60, width: int = 104, steps: int = 10, sparsities=(0.8, 0.9),
                      device: str = "cuda", dtype=torch.bfloat16, repeats: int = 2,
                      overrides: dict | None = None) -> dict:
    """Per-step time of the full-size Wan2.1-1.3B transformer (random weights; default latent
    21 x 60 x 104 = 480p, 81 frames: 32,760 tokens), dense vs AdaSpa over a whole schedule, median
    of ``repeats`` generations per step. ``overrides`` replaces config entries (toy sizes)."""
    config = {**WAN_1_3B, **(overrides or {})}
    torch.manual_seed(0)
    with torch.device(device):
        tr = WanTransformer3DModel(**config)
    tr = tr.to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 16, frames, height, width, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype, generator=g)
    timesteps = torch.linspace(999, 1, steps).round()

    def generation():
        return [_cuda_time(lambda: tr(x, timestep=torch.tensor([float(t)], device=device), encoder_hidden_states=ctx),
                           device) for t in timesteps]

    res = {"model": "wan2.1-t2v-1.3b", "layers": config["num_layers"],
           "tokens": frames * (height // 2) * (width // 2), "steps": steps, "repeats": repeats,
           "dtype": _dtype_name(dtype), "date": datetime.date.today().isoformat(), "device": device_name(device),
           "torch": torch.__version__}
    with torch.no_grad(), dense_sdpa_context():
        generation()
        dense = [generation() for _ in range(repeats)]
        res["dense_step_ms"] = statistics.median(v for run in dense for v in run)
        res["runs"] = []
        for s in sparsities:
            ditaccel.apply(tr, ditaccel.AdaSpaConfig(sparsity=s), num_inference_steps=steps)
            try:
                generation()  # warm-up (compiles the kernels)
                runs = [generation() for _ in range(repeats)]
                st = ditaccel.stats(tr)
            finally:
                ditaccel.remove(tr)
            plan = ditaccel.AdaSpaConfig(sparsity=s).schedule(steps)
            per_step = [statistics.median(run[i] for run in runs) for i in range(steps)]
            res["runs"].append({"sparsity": s, "schedule": plan, "step_ms": per_step, "total_ms": sum(per_step),
                                "attention_flops_ratio": st.attention_flops_ratio,
                                "mean_density": statistics.mean(st.details["density_per_layer"]),
                                "mean_recall": [statistics.mean(r[i] for r in st.details["recall_per_search"])
                                                for i in range(len(st.details["recall_per_search"][0]))],
                                "search_seconds": st.details["search_seconds"]})
    return res


#: HunyuanVideo (13B) transformer architecture, diffusers config
HUNYUAN_VIDEO = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)


#: the plan's per-layer cycle between its full (residual-refreshing) steps
PLAN_CYCLE = ("ast", "wars+asc", "wars", "ast")


def paper_like_plan(num_layers: int, steps: int = 50, refresh: int = 10) -> list[list[str]]:
    """``methods[layer][step]``: ``full`` at step 0 and every ``refresh`` steps (each refreshes the
    window residual), otherwise the layers cycle through :data:`PLAN_CYCLE`, shifted per layer so
    that every step mixes methods: the mix of sharing and window steps of the paper's D4-D6
    plans. Its attention-FLOPs ratio is measured by the benchmark (``ditaccel.stats``)."""
    return [["full" if s % refresh == 0 else PLAN_CYCLE[(layer + s) % len(PLAN_CYCLE)] for s in range(steps)]
            for layer in range(num_layers)]


def bench_pixart_plan(device: str = "cuda", dtype=torch.bfloat16, steps: int = 50, model: str = "pixart-sigma-2k",
                      dense_repeats: int = 1, overrides: dict | None = None,
                      cache_dtypes: tuple[str, ...] = ("model", "float8")) -> dict:
    """50 transformer calls dense vs. the same 50 with :func:`paper_like_plan` applied, once per
    entry of ``cache_dtypes`` (``DiTFastAttnConfig.cache_dtype``: caches in the model's dtype, in
    float8): time, peak memory over dense and the caches' peak bytes of each, in ``res["plans"]``.
    ``overrides`` replaces config entries (toy sizes for dry runs)."""
    tr = build_transformer(model, device, dtype, overrides=overrides)
    inputs = model_inputs(model, tr, 2, device, dtype)
    n_layers = len(tr.transformer_blocks)
    timesteps = torch.linspace(999, 1, steps).round()
    cfg = tr.config

    def generation():
        return [_cuda_time(lambda: tr(timestep=torch.full((2,), float(t), device=device), **inputs), device)
                for t in timesteps]

    res = {"model": model, "steps": steps, "batch": 2, "layers": n_layers, "heads": cfg.num_attention_heads,
           "head_dim": cfg.attention_head_dim, "tokens": (cfg.sample_size // cfg.patch_size) ** 2,
           **_meta(device, dtype)}
    plan = Plan.from_methods(tr, paper_like_plan(n_layers, steps), cfg=True)
    res["plan_counts"] = plan.counts()
    res["plans"] = []
    with torch.no_grad(), dense_sdpa_context():
        generation()  # warm-up
        base = _peak_reset(device)
        dense = [sum(generation()) for _ in range(dense_repeats)]
        res["dense_ms"] = statistics.median(dense)
        res["dense_peak_bytes"] = _peak(device, base)
        for cache_dtype in cache_dtypes:
            ditaccel.apply(tr, plan.with_cache_dtype(cache_dtype))
            try:
                generation()  # warm-up: compiles the window kernel
                base = _peak_reset(device)
                per_step = generation()
                peak = _peak(device, base)
                st = ditaccel.stats(tr)
            finally:
                ditaccel.remove(tr)
            res["plans"].append(dict(
                cache_dtype=cache_dtype, plan_ms=sum(per_step), plan_step_ms=per_step,
                speedup=res["dense_ms"] / sum(per_step), attention_flops_ratio=st.attention_flops_ratio,
                plan_peak_bytes=peak, extra_peak_bytes=peak - res["dense_peak_bytes"],
                cache_bytes_peak=st.cache_bytes_peak))
    return res


def hunyuan_inputs(frames: int, height: int, width: int, text_tokens: int, device: str, dtype) -> dict:
    """Latent and conditioning of one HunyuanVideo call (``frames x height x width`` latent)."""
    g = torch.Generator(device=device).manual_seed(0)
    return {"hidden_states": torch.randn(1, 16, frames, height, width, device=device, dtype=dtype, generator=g),
            "encoder_hidden_states": torch.randn(1, text_tokens, 4096, device=device, dtype=dtype, generator=g),
            "encoder_attention_mask": torch.ones(1, text_tokens, device=device, dtype=torch.bool),
            "pooled_projections": torch.randn(1, 768, device=device, dtype=dtype, generator=g),
            "guidance": torch.full((1,), 6000.0, device=device, dtype=dtype)}


def bench_hunyuan_adaspa(frames: int = 33, height: int = 90, width: int = 160, text_tokens: int = 256,
                         sparsity: float = 0.8, device: str = "cuda", dtype=torch.bfloat16, overrides: dict | None = None,
                         block_size: int = 64) -> dict:
    """One step of each AdaSpa kind on the full-size HunyuanVideo transformer, and dense.

    A 5-step bare-transformer schedule (warm-up 0.2, searches at 0.4 and 0.8) visits dense,
    dense, search, sparse, research: run once to compile, then timed. The 50-step total is
    ``10 dense + search + research + 38 sparse`` of these per-step times. Then the same with
    ``first_lse="previous"`` (dense, dense_lse, research, sparse, research; kernels already
    compiled; timed up to its first search, the steps after it are the first run's):
    ``9 dense + dense_lse + 2 research + 38 sparse``. Dense (no method applied) last, its cuDNN
    plans warmed by the runs' dense steps. Everything but ``dense_masked_ms`` (a dense step as
    diffusers runs it, with the inputs' all-True text mask, timed last after a warm-up call) runs under :func:`~ditaccel.bench.harness.trivial_masks_dropped`.
    """
    torch.manual_seed(0)
    with torch.device(device):
        tr = HunyuanVideoTransformer3DModel(**{**HUNYUAN_VIDEO, **(overrides or {})})
    tr = tr.to(dtype).eval().requires_grad_(False)
    inputs = hunyuan_inputs(frames, height, width, text_tokens, device, dtype)
    p = tr.config.patch_size
    res = {"model": "hunyuan-video", "latent": [frames, height, width], "video_tokens": frames * (height // p) *
           (width // p), "text_tokens": text_tokens, "sparsity": sparsity, "block_size": block_size,
           "layers": len(tr.transformer_blocks) + len(tr.single_transformer_blocks), **_meta(device, dtype)}
    times = [999.0, 800.0, 600.0, 400.0, 200.0]

    def call(t):
        return _cuda_time(lambda: tr(timestep=torch.tensor([t], device=device), **inputs), device)

    cfg = ditaccel.AdaSpaConfig(sparsity=sparsity, block_size=block_size, warmup=0.2, search_at=(0.4, 0.8))
    with torch.no_grad(), dense_sdpa_context(), trivial_masks_dropped():
        ditaccel.apply(tr, cfg, num_inference_steps=len(times))
        try:
            for t in times:  # warm-up generation: compiles and autotunes (its dense steps warm cuDNN)
                call(t)
            base = _peak_reset(device)
            per_step = [call(t) for t in times]
            res["adaspa_peak_bytes"] = _peak(device, base)
            st = ditaccel.stats(tr)
        finally:
            ditaccel.remove(tr)
        # first_lse="previous": its steps 3-4 (sparse, research) are the fresh run's; time up to the first search
        prev = dataclasses.replace(cfg, first_lse="previous")
        ditaccel.apply(tr, prev, num_inference_steps=len(times))
        try:
            per_step_prev = [call(t) for t in times[:3]]
        finally:
            ditaccel.remove(tr)
        base = _peak_reset(device)
        res["dense_ms"] = call(999.0)
        res["dense_peak_bytes"] = _peak(device, base)
    with torch.no_grad(), dense_sdpa_context():
        call(999.0)  # warm-up of the masked call's backend
        res["dense_masked_ms"] = call(999.0)  # as diffusers runs it: SDPA with the all-True text mask
    kinds = cfg.schedule(len(times))
    res["steps"] = [{"kind": k, "ms": ms} for k, ms in zip(kinds, per_step)]
    by = {k: ms for k, ms in zip(kinds, per_step)}
    res.update(search_ms=by["search"], sparse_ms=by["sparse"], research_ms=by["research"],
               adaspa_dense_step_ms=per_step[1], density=statistics.mean(st.details["density_per_layer"]))
    full = ditaccel.AdaSpaConfig(sparsity=sparsity).schedule(50)
    count = {k: full.count(k) for k in set(full)}
    res["schedule_50"] = count
    res["total_50_ms"] = (count["dense"] * res["dense_ms"] + count["search"] * res["search_ms"]
                          + count["research"] * res["research_ms"] + count["sparse"] * res["sparse_ms"])
    res["dense_50_ms"] = 50 * res["dense_ms"]
    res["speedup_50"] = res["dense_50_ms"] / res["total_50_ms"]
    # first_lse="previous": dense, dense_lse, research (the first search), sparse, research
    kinds_prev = prev.schedule(len(times))
    res["steps_previous"] = [{"kind": k, "ms": ms} for k, ms in zip(kinds_prev, per_step_prev)]
    res.update(dense_lse_ms=per_step_prev[kinds_prev.index("dense_lse")],
               first_research_ms=per_step_prev[kinds_prev.index("research")])
    full = ditaccel.AdaSpaConfig(sparsity=sparsity, first_lse="previous").schedule(50)
    count = {k: full.count(k) for k in set(full)}
    res["schedule_50_previous"] = count
    res["total_50_previous_ms"] = (count["dense"] * res["dense_ms"] + res["dense_lse_ms"] + res["first_research_ms"]
                                   + (count["research"] - 1) * res["research_ms"] + count["sparse"] * res["sparse_ms"])
    res["speedup_50_previous"] = res["dense_50_ms"] / res["total_50_previous_ms"]
    return res


#: Wan2.1-T2V-14B transformer architecture (diffusers config), random weights
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}

#: full-size video models of the DiTFastAttn step benchmark: (transformer class, config, 720p latent
#: frames x height x width; Wan 81 frames, HunyuanVideo 129 frames)
VIDEO_MODELS = {
    "wan2.1-14b-720p": (WanTransformer3DModel, WAN_14B, (21, 90, 160)),
    "hunyuan-video-720p": (HunyuanVideoTransformer3DModel, HUNYUAN_VIDEO, (33, 90, 160)),
}


@dataclasses.dataclass(frozen=True)
class VideoSetup:
    """How the video DiTFastAttn case runs a model.

    cfg: CFG as two calls per step (``WanPipeline``'s default); ``False``: one call per step
        (HunyuanVideo is guidance-distilled: ``HunyuanVideoPipeline`` runs one call unless
        ``true_cfg_scale > 1``, so ``asc`` / ``wars+asc`` do not apply).
    groups: the step kinds, measured as short plans (every layer alike) that each fit in one
        GPU's memory: a kind's caches are one (B, H, L, D) tensor per layer per CFG branch (Wan
        2.1-14B 720p: 31 GB per kind and branch; HunyuanVideo 720p: 44 GB). Every kind in one plan
        ran out of the H200's memory on HunyuanVideo; on Wan the bf16 groups keep residuals and ``ast``
        outputs of both branches apart (up to 124 GB together; that plan was not run in bf16).
    cycle: the 50-step plan's methods between its ``full`` steps (every 10 steps); its kinds are
        one of ``groups`` (``("full", *cycle kinds)``), whose measured peak memory is the plan's.
    """

    cfg: bool
    groups: tuple[tuple[str, ...], ...]
    cycle: tuple[str, ...]


VIDEO_SETUPS = {
    "wan2.1-14b-720p": VideoSetup(True, (("full", "wars"), ("full", "ast"), ("asc",), ("full", "wars+asc")),
                                  ("wars+asc",)),
    "hunyuan-video-720p": VideoSetup(False, (("full", "wars", "ast"),), ("wars", "ast")),
}

#: with ``cache_dtype="float8"`` the caches take half the bytes, so Wan's ``wars+asc`` residuals and
#: ``ast`` outputs of both branches fit together: the 50-step plan alternates them
VIDEO_SETUPS_FLOAT8 = {
    "wan2.1-14b-720p": VideoSetup(True, (("full", "wars+asc", "ast"),), ("wars+asc", "ast")),
    "hunyuan-video-720p": VIDEO_SETUPS["hunyuan-video-720p"],
}


def video_plan_50(cycle: tuple[str, ...], steps: int = 50, refresh: int = 10) -> list[str]:
    """One method per step (every layer alike): ``full`` every ``refresh`` steps (each refreshes the
    window residual), otherwise ``cycle`` over and over."""
    return ["full" if s % refresh == 0 else cycle[(s % refresh - 1) % len(cycle)] for s in range(steps)]


def _video_calls(model: str, tr, latent, text_tokens: int, device: str, dtype, cfg: bool):
    """One step of ``model``: with ``cfg`` the conditional and the unconditional call, each under its
    diffusers cache context (as ``WanPipeline`` runs them); without, one call."""
    f, h, w = latent
    if model.startswith("hunyuan"):
        cond = hunyuan_inputs(f, h, w, text_tokens, device, dtype)
        uncond = {**cond, "encoder_hidden_states": torch.randn_like(cond["encoder_hidden_states"])}
    else:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, 16, f, h, w, device=device, dtype=dtype, generator=g)
        ctx = torch.randn(1, text_tokens, tr.config.text_dim, device=device, dtype=dtype, generator=g)
        cond = {"hidden_states": x, "encoder_hidden_states": ctx}
        uncond = {"hidden_states": x, "encoder_hidden_states": torch.randn_like(ctx)}
    branches = (("cond", cond), ("uncond", uncond)) if cfg else (("cond", cond),)

    def step(t: float) -> float:
        ms = 0.0
        for branch, kw in branches:
            with tr.cache_context(branch):
                ms += _cuda_time(lambda: tr(timestep=torch.tensor([t], device=device), **kw), device)
        return ms

    return step


def bench_video_ditfastattn(model: str = "hunyuan-video-720p", device: str = "cuda", dtype=torch.bfloat16,
                            latent: tuple[int, int, int] | None = None, text_tokens: int = 256,
                            window: str = "band1d", window_size: float = 0.25, warmup: bool = True,
                            cache_dtype: str = "model", overrides: dict | None = None) -> dict:
    """DiTFastAttn on a full-size video transformer (random weights), run as :data:`VIDEO_SETUPS` says
    (CFG as two calls on Wan, one call on HunyuanVideo): one timed step of each kind, in short plans
    that each fit in memory (every layer alike), dense in the same run, and the 50-step plan
    :func:`video_plan_50` composed from those per-step times and per-step attention FLOPs
    (``ditaccel.stats``' FLOPs per method). Peak memory of dense and of each plan. ``warmup``: run the
    first plan once untimed first (compiles and autotunes the window kernels); ``cache_dtype``: the
    plans' cache storage (``"float8"``: :data:`VIDEO_SETUPS_FLOAT8`); ``overrides`` replaces config
    entries (toy sizes for dry runs). Dense and plans run under
    :func:`~ditaccel.bench.harness.trivial_masks_dropped` (HunyuanVideo's all-True text mask is
    dropped); on HunyuanVideo a dense step as diffusers runs it is timed last, after a warm-up call
    (``dense_masked_step_ms``)."""
    cls, config, default_latent = VIDEO_MODELS[model]
    setup = (VIDEO_SETUPS_FLOAT8 if cache_dtype == "float8" else VIDEO_SETUPS)[model]
    latent = tuple(latent or default_latent)
    torch.manual_seed(0)
    with torch.device(device):
        tr = cls(**{**config, **(overrides or {})})
    tr = tr.to(dtype).eval().requires_grad_(False)
    step = _video_calls(model, tr, latent, text_tokens, device, dtype, setup.cfg)
    n_layers = len(adapter_for(tr).attention_modules(tr))
    p = tr.config.patch_size if isinstance(tr.config.patch_size, int) else tr.config.patch_size[-1]  # spatial
    res = {"model": model, "latent": list(latent), "video_tokens": latent[0] * (latent[1] // p) * (latent[2] // p),
           "text_tokens": text_tokens, "layers": n_layers, "window": window, "window_size": window_size,
           "cfg": "two calls per step (cond, uncond)" if setup.cfg else "none (one call per step)",
           "cache_dtype": cache_dtype,
           "groups": [list(g) for g in setup.groups], **_meta(device, dtype)}

    def run_plan(kinds) -> tuple[list[float], int, object]:
        plan = Plan.from_methods(tr, [list(kinds) for _ in range(n_layers)], cfg=setup.cfg, window=window,
                                 window_size=window_size).with_cache_dtype(cache_dtype)
        times = torch.linspace(999, 1, len(kinds)).round().tolist()
        ditaccel.apply(tr, plan)
        try:
            base = _peak_reset(device)
            ms = [step(t) for t in times]
            return ms, _peak(device, base), ditaccel.stats(tr)
        finally:
            ditaccel.remove(tr)

    with torch.no_grad(), dense_sdpa_context(), trivial_masks_dropped():
        step(999.0)  # warm-up
        base = _peak_reset(device)
        res["dense_step_ms"] = step(999.0)
        res["dense_peak_bytes"] = _peak(device, base)
        if warmup:
            run_plan(setup.groups[0])
        timed: dict[str, list[float]] = {}
        flops: dict[str, float] = {}
        res["plans"] = []
        for kinds in setup.groups:
            ms, peak, st = run_plan(kinds)
            for k, t in zip(kinds, ms):
                timed.setdefault(k, []).append(t)
                # every step is one method in every layer: its share of the plan's attention FLOPs, times
                # the plan's steps, is that step's attention FLOPs as a fraction of a dense step
                flops[k] = st.attention_flops_by_method.get(k, 0.0) * len(kinds)
            res["plans"].append({"kinds": list(kinds), "step_ms": ms, "peak_bytes": peak,
                                 "cache_bytes_peak": st.cache_bytes_peak})
    if model.startswith("hunyuan"):  # dense as diffusers runs it: SDPA with the all-True text mask
        with torch.no_grad(), dense_sdpa_context():
            step(999.0)  # warm-up of the masked call's backend
            res["dense_masked_step_ms"] = step(999.0)
    by = {k: statistics.median(v) for k, v in timed.items()}
    res["steps"] = [{"kind": k, "ms": by[k], "speedup": res["dense_step_ms"] / by[k], "attention_flops": flops[k]}
                    for k in by]
    plan50 = video_plan_50(setup.cycle)
    kinds50 = tuple(dict.fromkeys(plan50))
    res["plan_50"] = {k: plan50.count(k) for k in kinds50}
    res["total_50_ms"] = sum(by[k] for k in plan50)
    res["dense_50_ms"] = 50 * res["dense_step_ms"]
    res["speedup_50"] = res["dense_50_ms"] / res["total_50_ms"]
    res["attention_flops_50"] = sum(flops[k] for k in plan50) / len(plan50)
    own = next(g for g in res["plans"] if set(g["kinds"]) == set(kinds50))  # the plan with the same caches
    res["plan_peak_bytes"], res["cache_bytes_peak"] = own["peak_bytes"], own["cache_bytes_peak"]
    return res


#: toy configs for ``ditaccel bench all --dry-run``
TOY_HUNYUAN = dict(num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=1,
                   num_refiner_layers=1, rope_axes_dim=(8, 12, 12))


class _NoCore:
    """A runtime method whose self-attention core returns ``v`` unchanged: the step without the
    attention core's work (projections, norms, MLPs and cross-attention still run)."""

    name = "no-core"

    def check_num_layers(self, n):
        pass

    def check_num_steps(self, n):
        pass

    def begin_call(self, ctx):
        pass

    def new_cache(self):
        return _NoCache()

    def attention(self, ctx, layer, call, cache):
        return call.core(lambda q, k, v, key_padding_mask=None, heads=None: v), 0.0, self.name


class _NoCache:
    def nbytes(self) -> int:
        return 0

    def release(self) -> None:
        pass


def bench_attention_share(model: str = "pixart-sigma-2k", device: str = "cuda", dtype=torch.bfloat16,
                          repeats: int = 5, overrides: dict | None = None, video_latent=(33, 90, 160),
                          text_tokens: int = 256) -> dict:
    """The self-attention cores' share of a dense transformer step at full size: the median step
    time dense (cuDNN SDPA first; HunyuanVideo's all-True text mask dropped, ``trivial_masks_dropped``)
    and with every self-attention core replaced by a no-op (``v``
    returned), share = 1 − no-core / dense. ``model``: ``"pixart-sigma-2k"`` (CFG batch 2, 16,384
    tokens) or ``"hunyuan-video-720p"`` (``video_latent`` frames × height × width, ``text_tokens``).
    This is the ``a`` of ``ditaccel worth``'s full-size time model."""
    if model == "hunyuan-video-720p":
        torch.manual_seed(0)
        with torch.device(device):
            tr = HunyuanVideoTransformer3DModel(**{**HUNYUAN_VIDEO, **(overrides or {})})
        tr = tr.to(dtype).eval().requires_grad_(False)
        inputs = hunyuan_inputs(*video_latent, text_tokens, device, dtype)
        batch, shape = 1, {"latent": list(video_latent), "text_tokens": text_tokens}
    elif model == "pixart-sigma-2k":
        tr = build_transformer(model, device, dtype, overrides=overrides)
        batch = 2
        inputs = model_inputs(model, tr, batch, device, dtype)
        shape = {"tokens": (tr.config.sample_size // tr.config.patch_size) ** 2}
    else:
        raise ValueError(f"model must be 'pixart-sigma-2k' or 'hunyuan-video-720p', got {model!r}")
    t = torch.full((batch,), 500.0, device=device)

    def step():
        return _cuda_time(lambda: tr(timestep=t, **inputs), device)

    with torch.no_grad(), dense_sdpa_context(), trivial_masks_dropped():  # HunyuanVideo's all-True text mask
        step()  # warm-up
        dense = [step() for _ in range(repeats)]
        install(tr, _NoCore())
        try:
            step()
            no_core = [step() for _ in range(repeats)]
        finally:
            remove(tr)
    d, o = statistics.median(dense), statistics.median(no_core)
    return {"model": model, "batch": batch, **shape, "repeats": repeats, **_meta(device, dtype),
            "dense_ms": d, "no_core_ms": o, "share": 1.0 - o / d}
