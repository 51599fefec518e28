"""Speed measurements on full-size architectures with random weights (no downloads).

``ditaccel bench step``: per-denoising-step time of a full-size transformer, dense vs. a
hand-made DiTFastAttn plan whose every step uses one method across all layers, so each step's
time is that method's time. ``ditaccel bench attention``: the attention kernels alone (dense SDPA
vs. window attention) with effective TFLOP/s.

Timing: CUDA events after warm-up, median over repeats; dense SDPA runs with cuDNN first in the
backend priority (the fastest on H100), never FlashAttention-2 as the baseline.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import statistics
import time

import torch
import torch.nn.functional as F

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


def dense_sdpa_context():
    """SDPA with cuDNN attention first in the priority list (falls back if unsupported)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch without set_priority
        return contextlib.nullcontext()


def build_transformer(model: str, device: str, dtype: torch.dtype, seed: int = 0):
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    cls = PixArtTransformer2DModel if model.startswith("pixart") else DiTTransformer2DModel
    torch.manual_seed(seed)
    with torch.device(device):
        tr = cls(**MODELS[model])
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


def _cuda_time(fn, device) -> float:
    if not device.startswith("cuda"):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def bench_step(model: str = "pixart-sigma-2k", device: str = "cuda", dtype=torch.bfloat16, batch: int = 2,
               repeats: int = 5, window: str = "band1d") -> dict:
    """Per-step transformer time: dense vs. each DiTFastAttn method (a hand-made plan)."""
    import ditaccel
    from ditaccel.plan import Plan

    tr = build_transformer(model, device, dtype)
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

    results = {"model": model, "tokens": grid * grid, "batch": batch, "heads": tr.config.num_attention_heads,
               "head_dim": tr.config.attention_head_dim, "dtype": str(dtype).replace("torch.", ""),
               "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "window": window, "date": datetime.date.today().isoformat()}
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


def bench_attention(tokens: int = 16384, heads: int = 16, head_dim: int = 72, batch: int = 2,
                    device: str = "cuda", dtype=torch.bfloat16, window: str = "band1d",
                    window_size: float = 0.25) -> dict:
    """Dense SDPA (cuDNN priority) vs. window attention at one shape, with TFLOP/s."""
    import math

    from ditaccel.kernels.window import window_attention, window_pair_fraction, window_tile_fraction
    from ditaccel.methods.ditfastattn import make_window

    side = math.isqrt(tokens)
    spec = make_window(window, window_size, (side, tokens // side))
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    flops = 4.0 * batch * heads * tokens * tokens * head_dim
    res = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "batch": batch, "window": window,
           "tile_fraction": window_tile_fraction(spec), "pair_fraction": window_pair_fraction(spec)}
    if device.startswith("cuda"):
        from triton.testing import do_bench

        with dense_sdpa_context():
            res["dense_ms"] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=100, rep=500,
                                       return_mode="median")
        window_attention(q, k, v, spec)
        res["window_ms"] = do_bench(lambda: window_attention(q, k, v, spec), warmup=100, rep=500,
                                    return_mode="median")
        from ditaccel.kernels.window_residual import full_and_window_attention

        full_and_window_attention(q, k, v, spec)  # the experimental one-pass kernel (autotunes here)
        res["full_plus_window_two_calls_ms"] = res["dense_ms"] + res["window_ms"]
        res["full_and_window_one_pass_ms"] = do_bench(lambda: full_and_window_attention(q, k, v, spec), warmup=100,
                                                      rep=500, return_mode="median")
    else:
        res["dense_ms"] = statistics.median(_cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), device)
                                            for _ in range(5))
        res["window_ms"] = statistics.median(_cuda_time(lambda: window_attention(q, k, v, spec), device)
                                             for _ in range(5))
    res["dense_tflops"] = flops / res["dense_ms"] / 1e9
    res["window_effective_tflops"] = flops * res["tile_fraction"] / res["window_ms"] / 1e9
    res["speedup"] = res["dense_ms"] / res["window_ms"]
    return res


def bench_sweep(model: str = "tiny-dit", steps: int = 20, device: str = "cpu", thresholds=None,
                window: str = "band1d", search: str = "greedy") -> dict:
    """Calibrate at each threshold (default D1..D6) on a built-in offline model; report calibration
    time, attention-FLOPs ratio of a generation with the plan, and its PSNR against dense."""
    import numpy as np

    import ditaccel
    from ditaccel.cli import _call_params, _inputs, load_pipeline, psnr
    from ditaccel.methods.ditfastattn import PRESETS
    from ditaccel.viz import to_uint8

    thresholds = thresholds or list(PRESETS)
    pipe = load_pipeline(model, device, torch.float32 if device == "cpu" else torch.bfloat16)
    is_dit = "class_labels" in _call_params(pipe)
    calib = _inputs(pipe, None, None, 8 if is_dit else 6)  # the paper: 8 labels / 6 captions
    sample = _inputs(pipe, None, [3, 404] if is_dit else None, 2)
    if not is_dit:
        sample = {**_inputs(pipe, ["a small house by a lake", "two dogs playing in the snow"], None, 2)}
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in _call_params(pipe) else {}

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


def format_sweep(r: dict) -> str:
    lines = [f"{r['model']} ({r['class']}, {r['layers']} layers, {r['tokens']} tokens), {r['steps']} steps, "
             f"{r['calibration_inputs']} calibration inputs, window {r['window']}, search {r['search']}, "
             f"{r['device']} ({r['torch_threads']} threads), torch {r['torch']}, {r['date']}",
             "| δ | calibration (s) | attention FLOPs | full/wars/ast/asc/wars+asc | PSNR vs dense (dB) |",
             "|---|---|---|---|---|"]
    for x in r["rows"]:
        c = x["plan_counts"]
        counts = "/".join(str(c[m]) for m in ("full", "wars", "ast", "asc", "wars+asc"))
        lines.append(f"| {x['threshold']} ({x['delta']:.3f}) | {x['calibration_s']:.1f} | "
                     f"{100 * x['attention_flops_ratio']:.1f}% | {counts} | {x['psnr_vs_dense']:.1f} |")
    return "\n".join(lines)


def structured_qkv(frames: int, rows: int, cols: int, heads: int, head_dim: int, device: str, dtype,
                   text_tokens: int = 0, seed: int = 0):
    """q, k, v (1, H, L, D) whose attention has video-like structure: each head attends to
    space-time neighbours at its own scale (Fourier features of (t, y, x) positions; small scales
    = local heads, large = near-global), plus a little noise. L = frames·rows·cols + text."""
    g = torch.Generator(device=device).manual_seed(seed)
    t, y, x = torch.meshgrid(torch.arange(frames, device=device), torch.arange(rows, device=device),
                             torch.arange(cols, device=device), indexing="ij")
    pos = torch.stack([t.flatten() * 4.0, y.flatten().float(), x.flatten().float()], dim=1)  # (N, 3)
    n_freq = head_dim // 6
    qs, ks = [], []
    for h in range(heads):
        scale = 2.0 ** (-(h % 6))  # local ... global
        freqs = torch.randn(3, n_freq, device=device, generator=g) * scale
        ang = pos @ freqs
        feat = torch.cat([ang.sin(), ang.cos()], dim=1).repeat(1, 3)[:, :head_dim]
        feat = torch.nn.functional.pad(feat, (0, head_dim - feat.shape[1]))
        sharp = 6.0 / head_dim**0.5
        qs.append(feat * sharp * head_dim**0.5)
        ks.append(feat)
    q, k = torch.stack(qs)[None], torch.stack(ks)[None]
    if text_tokens:
        q = torch.cat([q, torch.randn(1, heads, text_tokens, head_dim, device=device, generator=g)], dim=2)
        k = torch.cat([k, torch.randn(1, heads, text_tokens, head_dim, device=device, generator=g)], dim=2)
    q = q + 0.1 * torch.randn(q.shape, device=device, generator=g)
    v = torch.randn(q.shape, device=device, generator=g)
    return q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()


def bench_adaspa(frames: int = 32, rows: int = 45, cols: int = 80, heads: int = 24, head_dim: int = 128,
                 text_tokens: int = 0, sparsities=(0.8, 0.9), block_size: int = 64, device: str = "cuda",
                 dtype=torch.bfloat16) -> dict:
    """AdaSpa's kernels at a real shape (default ≈ HunyuanVideo 720p: 32·45·80 + 0 = 115,200
    video tokens): search with fresh LSE (full attention + LSE, block mass), search with the
    cached LSE (block mass only), and block-sparse attention, each next to dense SDPA."""
    from ditaccel.kernels.block_mass import attention_with_lse, block_mass
    from ditaccel.kernels.block_sparse import block_sparse_attention, block_sparse_flops, mask_to_indices
    from ditaccel.methods.adaspa import AdaSpaConfig, select_mask, text_blocks

    q, k, v = structured_qkv(frames, rows, cols, heads, head_dim, device, dtype, text_tokens)
    L = q.shape[2]
    dense_flops = 4.0 * heads * L * L * head_dim

    def timed(fn):
        if device.startswith("cuda"):
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        return statistics.median(_cuda_time(fn, device) for _ in range(3))

    res = {"tokens": L, "heads": heads, "head_dim": head_dim, "block_size": block_size, "text_tokens": text_tokens,
           "dtype": str(dtype).replace("torch.", ""), "date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "torch": torch.__version__}
    with dense_sdpa_context():
        res["dense_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    _, lse = attention_with_lse(q, k, v)
    res["attention_with_lse_ms"] = timed(lambda: attention_with_lse(q, k, v))
    res["block_mass_ms"] = timed(lambda: block_mass(q, k, lse, block_size=block_size))
    W = block_mass(q, k, lse, block_size=block_size)
    always = text_blocks(L, block_size, text_tokens, "suffix", q.device) if text_tokens else None
    res["select_ms"] = timed(lambda: select_mask(W, AdaSpaConfig(block_size=block_size), always))
    res["search_first_ms"] = res["attention_with_lse_ms"] + res["block_mass_ms"] + res["select_ms"]
    res["search_cached_ms"] = res["block_mass_ms"] + res["select_ms"]
    res["sparse"] = []
    for s in sparsities:
        mask, _, rec = select_mask(W, AdaSpaConfig(sparsity=s, block_size=block_size), always)
        idx, cnt = mask_to_indices(mask)
        ms = timed(lambda: block_sparse_attention(q, k, v, idx, cnt, block_size=block_size))
        flops = block_sparse_flops(cnt, block_size, L, head_dim)
        res["sparse"].append({"sparsity": s, "density": float(mask.float().mean()), "recall": float(rec.mean()),
                              "ms": ms, "speedup": res["dense_ms"] / ms, "effective_tflops": flops / ms / 1e9})
    res["dense_tflops"] = dense_flops / res["dense_ms"] / 1e9
    return res


def format_adaspa(r: dict) -> str:
    lines = [f"AdaSpa kernels: 1 x {r['heads']} heads x {r['tokens']} tokens x {r['head_dim']}, block {r['block_size']}, "
             f"{r['dtype']}, {r['device']}, torch {r['torch']}, {r['date']}",
             f"  dense SDPA (cuDNN first)        {r['dense_ms']:9.2f} ms  ({r['dense_tflops']:.0f} TFLOP/s)",
             f"  first search: attention + LSE   {r['attention_with_lse_ms']:9.2f} ms",
             f"                block mass        {r['block_mass_ms']:9.2f} ms  ({r['block_mass_ms'] / r['dense_ms']:.2f}x dense)",
             f"                top-k + tiers     {r['select_ms']:9.2f} ms",
             f"  first search total              {r['search_first_ms']:9.2f} ms",
             f"  cached-LSE search total         {r['search_cached_ms']:9.2f} ms"]
    for x in r["sparse"]:
        lines.append(f"  sparse s={x['sparsity']}: density {x['density']:.3f}, recall {x['recall']:.3f}, "
                     f"{x['ms']:.2f} ms ({x['speedup']:.2f}x dense, {x['effective_tflops']:.0f} TFLOP/s effective)")
    return "\n".join(lines)


#: Wan2.1-T2V-1.3B transformer architecture (diffusers config), random weights
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def bench_adaspa_step(frames: int = 21, height: int = 60, width: int = 104, steps: int = 10, sparsities=(0.8, 0.9),
                      device: str = "cuda", dtype=torch.bfloat16, repeats: int = 2) -> dict:
    """Per-step time of the full-size Wan2.1-1.3B transformer (random weights; default latent
    21 x 60 x 104 = 480p, 81 frames: 32,760 tokens), dense vs AdaSpa over a whole schedule."""
    from diffusers import WanTransformer3DModel

    import ditaccel

    torch.manual_seed(0)
    with torch.device(device):
        tr = WanTransformer3DModel(**WAN_1_3B)
    tr = tr.to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 16, frames, height, width, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(1, 512, WAN_1_3B["text_dim"], device=device, dtype=dtype, generator=g)
    timesteps = torch.linspace(999, 1, steps).round()

    def generation():
        return [_cuda_time(lambda: tr(x, timestep=torch.tensor([float(t)], device=device), encoder_hidden_states=ctx),
                           device) for t in timesteps]

    res = {"model": "wan2.1-t2v-1.3b", "tokens": frames * (height // 2) * (width // 2), "steps": steps,
           "dtype": str(dtype).replace("torch.", ""), "date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "torch": torch.__version__}
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


def format_adaspa_step(r: dict) -> str:
    lines = [f"{r['model']} transformer (random weights), {r['tokens']} tokens, {r['steps']} steps, {r['dtype']}, "
             f"{r['device']}, torch {r['torch']}, {r['date']}",
             f"  dense step (SDPA, cuDNN first): {r['dense_step_ms']:.1f} ms; {r['steps']} steps "
             f"{r['dense_step_ms'] * r['steps']:.0f} ms"]
    for run in r["runs"]:
        by = {}
        for what, ms in zip(run["schedule"], run["step_ms"]):
            by.setdefault(what, []).append(ms)
        parts = ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in by.items())
        lines.append(f"  AdaSpa s={run['sparsity']}: {parts}; total {run['total_ms']:.0f} ms "
                     f"({r['dense_step_ms'] * r['steps'] / run['total_ms']:.2f}x), attention FLOPs "
                     f"{100 * run['attention_flops_ratio']:.1f}%, density {run['mean_density']:.3f}, recall "
                     f"{', '.join(f'{x:.3f}' for x in run['mean_recall'])}")
    return "\n".join(lines)


def format_step(r: dict) -> str:
    lines = [f"{r['model']} transformer, {r['tokens']} tokens x batch {r['batch']} (CFG), {r['heads']} heads x "
             f"{r['head_dim']}, {r['dtype']}, {r['device']}, torch {r['torch']}, window {r['window']}, {r['date']}",
             f"  dense step (SDPA, cuDNN first): {r['dense_step_ms']:.1f} ms"]
    for s in r["steps"]:
        lines.append(f"  step {s['step']}  {s['method']:<9} {s['ms']:8.1f} ms   {s['speedup']:.2f}x")
    lines.append(f"  plan total {r['plan_total_ms']:.1f} ms vs dense {r['dense_total_ms']:.1f} ms "
                 f"({r['dense_total_ms'] / r['plan_total_ms']:.2f}x); attention FLOPs "
                 f"{100 * r['attention_flops_ratio']:.1f}%; peak cache {r['cache_bytes_peak'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="ditaccel bench")
    ap.add_argument("what", choices=["step", "attention", "sweep", "adaspa", "adaspa-step"])
    ap.add_argument("--model", default=None,
                    help=f"step: one of {sorted(MODELS)}; sweep: a built-in offline model (tiny-dit, tiny-pixart, ...)")
    ap.add_argument("--steps", type=int, default=20, help="sweep: denoising steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--window", default="band1d", choices=["band1d", "neighborhood2d"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--search", default="greedy", choices=["greedy", "local"], help="sweep: plan search")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "step":
        r = bench_step(args.model or "pixart-sigma-2k", args.device, repeats=args.repeats, window=args.window)
        print(format_step(r))
    elif args.what == "adaspa-step":
        r = bench_adaspa_step(device=args.device, repeats=args.repeats)
        print(format_adaspa_step(r))
    elif args.what == "adaspa":
        r = bench_adaspa(device=args.device)
        print(format_adaspa(r))
    elif args.what == "sweep":
        r = bench_sweep(args.model or "tiny-dit", args.steps, args.device, window=args.window, search=args.search)
        print(format_sweep(r))
    else:
        r = bench_attention(args.tokens, head_dim=args.head_dim, device=args.device, window=args.window)
        print(json.dumps(r, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0
