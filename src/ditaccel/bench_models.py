"""Model-level timings on full-size transformers with random weights (no downloads).

* :func:`bench_pixart_plan`: PixArt-Sigma-XL-2 2K (28 layers, 16 heads x 72, 16,384 tokens, CFG
  batch 2), a whole 50-step DiTFastAttn plan at <= 25% of dense attention FLOPs against 50
  dense steps: transformer time and peak GPU memory of each.
* :func:`bench_hunyuan_adaspa`: HunyuanVideo 720p, 129 frames (33 x 45 x 80 = 118,800 video +
  256 text tokens, 24 heads x 128, 20 dual- + 40 single-stream blocks): the time of each kind
  of AdaSpa step (dense, first search, sparse, cached-LSE search), measured, and the 50-step
  schedule time they imply (10 dense, searches at 10 and 30, 38 sparse, s = 0.8).

Timing: CUDA events around each transformer call, after a warm-up pass that compiles and
autotunes the kernels; dense attention is SDPA with cuDNN first (``bench.dense_sdpa_context``).
"""

from __future__ import annotations

import datetime
import statistics

import torch

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


def _meta(device: str, dtype) -> dict:
    import triton

    return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "dtype": str(dtype).replace("torch.", "")}


def _peak_reset(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak(device: str, base: int) -> int:
    return torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else 0


def bench_pixart_plan(device: str = "cuda", dtype=torch.bfloat16, steps: int = 50, model: str = "pixart-sigma-2k",
                      dense_repeats: int = 1, overrides: dict | None = None) -> dict:
    """50 transformer calls dense vs. the same 50 with :func:`paper_like_plan` applied.
    ``overrides`` replaces config entries (toy sizes for dry runs)."""
    import ditaccel
    from ditaccel.bench import _cuda_time, build_transformer, dense_sdpa_context, model_inputs
    from ditaccel.plan import Plan

    tr = build_transformer(model, device, dtype, overrides=overrides)
    inputs = model_inputs(model, tr, 2, device, dtype)
    n_layers = len(tr.transformer_blocks)
    timesteps = torch.linspace(999, 1, steps).round()

    def generation():
        return [_cuda_time(lambda: tr(timestep=torch.full((2,), float(t), device=device), **inputs), device)
                for t in timesteps]

    res = {"model": model, "steps": steps, "batch": 2, "layers": n_layers, **_meta(device, dtype)}
    with torch.no_grad(), dense_sdpa_context():
        generation()  # warm-up
        base = _peak_reset(device)
        dense = [sum(generation()) for _ in range(dense_repeats)]
        res["dense_ms"] = statistics.median(dense)
        res["dense_peak_bytes"] = _peak(device, base)
        plan = Plan.from_methods(tr, paper_like_plan(n_layers, steps), cfg=True)
        ditaccel.apply(tr, plan)
        try:
            generation()  # warm-up: compiles the window kernel
            base = _peak_reset(device)
            per_step = generation()
            res["plan_peak_bytes"] = _peak(device, base)
            st = ditaccel.stats(tr)
        finally:
            ditaccel.remove(tr)
    res.update(plan_ms=sum(per_step), plan_step_ms=per_step, speedup=res["dense_ms"] / sum(per_step),
               attention_flops_ratio=st.attention_flops_ratio, cache_bytes_peak=st.cache_bytes_peak,
               plan_counts=plan.counts(), extra_peak_bytes=res["plan_peak_bytes"] - res["dense_peak_bytes"])
    return res


def format_pixart_plan(r: dict) -> str:
    c = r["plan_counts"]
    return "\n".join([
        f"{r['model']} transformer, {r['steps']} steps, batch {r['batch']} (CFG), {r['device']}, torch {r['torch']}, "
        f"Triton {r['triton']}, {r['date']}",
        f"  dense: {r['dense_ms'] / 1e3:.2f} s, peak {r['dense_peak_bytes'] / 2**30:.2f} GiB",
        f"  plan ({', '.join(f'{m} {n}' for m, n in c.items())}; attention FLOPs "
        f"{100 * r['attention_flops_ratio']:.1f}%): {r['plan_ms'] / 1e3:.2f} s ({r['speedup']:.2f}x), "
        f"peak {r['plan_peak_bytes'] / 2**30:.2f} GiB (+{r['extra_peak_bytes'] / 2**30:.2f} GiB over dense; "
        f"caches {r['cache_bytes_peak'] / 2**30:.2f} GiB)",
    ])


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
    ``10 dense + search + research + 38 sparse`` of these per-step times.
    """
    from diffusers import HunyuanVideoTransformer3DModel

    import ditaccel
    from ditaccel.bench import _cuda_time, dense_sdpa_context

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
    with torch.no_grad(), dense_sdpa_context():
        call(999.0)  # warm-up
        base = _peak_reset(device)
        res["dense_ms"] = call(999.0)
        res["dense_peak_bytes"] = _peak(device, base)
        ditaccel.apply(tr, cfg, num_inference_steps=len(times))
        try:
            for t in times:  # warm-up generation: compiles and autotunes
                call(t)
            base = _peak_reset(device)
            per_step = [call(t) for t in times]
            res["adaspa_peak_bytes"] = _peak(device, base)
            st = ditaccel.stats(tr)
        finally:
            ditaccel.remove(tr)
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
    return res


def format_hunyuan_adaspa(r: dict) -> str:
    c = r["schedule_50"]
    return "\n".join([
        f"HunyuanVideo transformer (random weights), latent {'x'.join(map(str, r['latent']))} = {r['video_tokens']} video "
        f"+ {r['text_tokens']} text tokens, AdaSpa s={r['sparsity']} block {r['block_size']}, {r['device']}, "
        f"torch {r['torch']}, Triton {r['triton']}, {r['date']}",
        f"  dense step {r['dense_ms'] / 1e3:.2f} s | first search {r['search_ms'] / 1e3:.2f} s | sparse "
        f"{r['sparse_ms'] / 1e3:.2f} s ({r['dense_ms'] / r['sparse_ms']:.2f}x) | cached search "
        f"{r['research_ms'] / 1e3:.2f} s | density {r['density']:.3f}",
        f"  50 steps ({c['dense']} dense, {c['search']} search, {c['research']} cached search, {c['sparse']} sparse): "
        f"{r['total_50_ms'] / 1e3:.1f} s vs {r['dense_50_ms'] / 1e3:.1f} s dense ({r['speedup_50']:.2f}x); peak "
        f"{r['adaspa_peak_bytes'] / 2**30:.1f} GiB vs {r['dense_peak_bytes'] / 2**30:.1f} GiB dense",
    ])


#: toy configs for ``ditaccel bench all --dry-run``
TOY_HUNYUAN = dict(num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=1,
                   num_refiner_layers=1, rope_axes_dim=(8, 12, 12))


def pixart_plan_shapes(r: dict) -> str:
    return (f"{r['model']} transformer, random weights, {r['layers']} layers, batch 2 (the CFG pair), "
            f"{r['steps']} steps, {r['dtype']}; plan `bench_models.paper_like_plan` (full every 10 steps)")


def markdown_pixart_plan(r: dict) -> str:
    c = ", ".join(f"{m} {n}" for m, n in r["plan_counts"].items())
    gib = 2**30
    return "\n".join([
        "| | transformer time, all steps | speed-up | attention FLOPs | peak GPU memory | over dense |",
        "|---|---|---|---|---|---|",
        f"| dense SDPA | {r['dense_ms'] / 1e3:.2f} s | 1.00× | 100% | {r['dense_peak_bytes'] / gib:.2f} GiB | |",
        f"| DiTFastAttn plan ({c}) | {r['plan_ms'] / 1e3:.2f} s | **{r['speedup']:.2f}×** | "
        f"{100 * r['attention_flops_ratio']:.1f}% | {r['plan_peak_bytes'] / gib:.2f} GiB | "
        f"+{r['extra_peak_bytes'] / gib:.2f} GiB (caches {r['cache_bytes_peak'] / gib:.2f} GiB) |",
    ])


def hunyuan_shapes(r: dict) -> str:
    return (f"HunyuanVideo transformer, random weights, {r['layers']} blocks, latent "
            f"{'×'.join(map(str, r['latent']))} = {r['video_tokens']:,} video + {r['text_tokens']} text tokens, "
            f"{r['dtype']}, AdaSpa s = {r['sparsity']}, block {r['block_size']}; one measured step of each kind")


def markdown_hunyuan(r: dict) -> str:
    c = r["schedule_50"]
    d = r["dense_ms"]
    gib = 2**30
    return "\n".join([
        "| step kind | ms | time / dense step |",
        "|---|---|---|",
        f"| dense | {d:.0f} | 1.00× |",
        f"| first search (fresh LSE) | {r['search_ms']:.0f} | {r['search_ms'] / d:.2f}× |",
        f"| sparse (density {r['density']:.3f}) | {r['sparse_ms']:.0f} | **{r['sparse_ms'] / d:.2f}×** |",
        f"| cached-LSE search | {r['research_ms']:.0f} | {r['research_ms'] / d:.2f}× |",
        f"| **50 steps** ({c['dense']} dense, {c['search']} + {c['research']} searches, {c['sparse']} sparse) | "
        f"{r['total_50_ms'] / 1e3:.1f} s vs {r['dense_50_ms'] / 1e3:.1f} s dense | speed-up **{r['speedup_50']:.2f}×** |",
        f"| peak GPU memory | {r['adaspa_peak_bytes'] / gib:.1f} GiB vs {r['dense_peak_bytes'] / gib:.1f} GiB dense | |",
    ])


# ------------------------------------------------------------------------------ attention share
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
    time dense (cuDNN SDPA first) and with every self-attention core replaced by a no-op (``v``
    returned), share = 1 − no-core / dense. ``model``: ``"pixart-sigma-2k"`` (CFG batch 2, 16,384
    tokens) or ``"hunyuan-video-720p"`` (``video_latent`` frames × height × width, ``text_tokens``).
    This is the ``a`` of ``ditaccel worth``'s full-size time model."""
    from diffusers import HunyuanVideoTransformer3DModel

    from .bench import _cuda_time, build_transformer, dense_sdpa_context, model_inputs
    from .runtime import install, remove

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

    with torch.no_grad(), dense_sdpa_context():
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


def attention_share_shapes(r: dict) -> str:
    what = (f"latent {'×'.join(map(str, r['latent']))} + {r['text_tokens']} text tokens" if "latent" in r
            else f"{r['tokens']:,} tokens, batch {r['batch']} (the CFG pair)")
    return (f"{r['model']} transformer, random weights, {what}, {r['dtype']}; median of {r['repeats']} steps "
            "dense and with every self-attention core replaced by a no-op")


def markdown_attention_share(r: dict) -> str:
    return "\n".join([
        "| dense step | step without the self-attention cores | attention share |",
        "|---|---|---|",
        f"| {r['dense_ms']:.1f} ms | {r['no_core_ms']:.1f} ms | **{100 * r['share']:.1f}%** |",
    ])
