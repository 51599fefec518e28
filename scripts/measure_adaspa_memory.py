"""Peak memory of AdaSpa over dense on the whole HunyuanVideo transformer (issue 16 §2).

What it runs (the inputs of ``bench.model_cases.bench_hunyuan_adaspa``): the full-size HunyuanVideo
transformer (``bench.model_cases.HUNYUAN_VIDEO``: 24 heads x 128, 20 dual- + 40 single-stream blocks =
60 attention layers, random weights), bf16, 720p 129 frames = latent 33 x 90 x 160 (33 x 45 x 80
= 118,800 video tokens) + 256 text tokens (``bench.model_cases.hunyuan_inputs``), AdaSpa s = 0.8,
64-token blocks, paper tiers. One dense call, then a 5-step AdaSpa schedule (warm-up 0.2, searches
at 0.4 and 0.8: dense, dense, first search, sparse, cached-LSE search), which visits every kind of
step once; a 50-step generation holds the same caches between its steps (searched masks of all 60
layers, plus their LSE until the last search that reads it).

Measured (CUDA): for the dense call and for each AdaSpa step, the peak allocated memory during the
call minus what was allocated before the generation (weights and inputs), and what stays allocated
after each step (the caches of all layers); each layer's cache bytes (``AdaSpaCache.nbytes()``)
after each step, against ``methods.adaspa.cache_bytes_per_layer``. The goal is an AdaSpa peak at
most 1.5 GiB over dense for the whole model. On the CPU (``--toy``) only the cache bytes are
measured (no allocator statistics); it checks the script end to end on tiny shapes.

Usage (the GPU measurement, about 12 transformer calls at full size)::

    python scripts/measure_adaspa_memory.py --device cuda --json out.json
    python scripts/measure_adaspa_memory.py --toy --device cpu --json toy.json   # tiny, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

GOAL_GIB = 1.5
TOY = dict(frames=3, height=16, width=16, text_tokens=20, block_size=16)


def _held(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return None


def _layer_caches(tr) -> dict[int, object]:
    """layer -> AdaSpaCache of the (single) branch state."""
    from ditaccel.runtime import get_runtime

    states = list(get_runtime(tr).state_manager._state_cache.values())
    return {layer: c for st in states for layer, c in st.caches.items()}


def measure(device: str = "cuda", toy: bool = False, sparsity: float = 0.8, block_size: int | None = None,
            warmup: bool = True, dtype: torch.dtype | None = None) -> dict:
    from diffusers import HunyuanVideoTransformer3DModel

    import ditaccel
    from ditaccel.bench.harness import _cuda_time, dense_sdpa_context
    from ditaccel.bench.model_cases import HUNYUAN_VIDEO, TOY_HUNYUAN, hunyuan_inputs
    from ditaccel.methods.adaspa import cache_bytes_per_layer

    frames, height, width, text_tokens = (TOY["frames"], TOY["height"], TOY["width"], TOY["text_tokens"]) if toy \
        else (33, 90, 160, 256)
    block_size = block_size or (TOY["block_size"] if toy else 64)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):
        tr = HunyuanVideoTransformer3DModel(**{**HUNYUAN_VIDEO, **(TOY_HUNYUAN if toy else {})})
    tr = tr.to(dtype).eval().requires_grad_(False)
    inputs = hunyuan_inputs(frames, height, width, text_tokens, device, dtype)
    cfg = tr.config
    video_tokens = frames * (height // cfg.patch_size) * (width // cfg.patch_size)
    tokens = video_tokens + text_tokens
    heads = cfg.num_attention_heads
    layers = len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
    import triton

    res = {
        "what": "AdaSpa peak memory over dense, whole HunyuanVideo transformer (scripts/measure_adaspa_memory.py)",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "dtype": str(dtype).replace("torch.", ""),
        "toy": toy, "latent": [frames, height, width], "video_tokens": video_tokens, "text_tokens": text_tokens,
        "tokens": tokens, "heads": heads, "head_dim": cfg.attention_head_dim, "layers": layers,
        "sparsity": sparsity, "block_size": block_size, "head_rule": "tiers", "batch": 1,
    }
    times = [999.0, 800.0, 600.0, 400.0, 200.0]

    def call(t):
        return _cuda_time(lambda: tr(timestep=torch.tensor([t], device=device), **inputs), device)

    ada = ditaccel.AdaSpaConfig(sparsity=sparsity, block_size=block_size, warmup=0.2, search_at=(0.4, 0.8))
    kinds = ada.schedule(len(times))
    with torch.no_grad(), dense_sdpa_context():
        call(999.0)  # warm-up
        base = _held(device)
        _reset_peak(device)
        res["dense_ms"] = call(999.0)
        peak = _peak(device)
        res["dense_peak_bytes"] = None if peak is None else peak - base
        ditaccel.apply(tr, ada, num_inference_steps=len(times))
        try:
            if warmup:  # compiles and autotunes the kernels; its caches are freed at its last step
                for t in times:
                    call(t)
            base = _held(device)
            steps, per_layer = [], {}
            for t, kind in zip(times, kinds):
                _reset_peak(device)
                ms = call(t)
                peak = _peak(device)
                sizes = {layer: c.nbytes() for layer, c in _layer_caches(tr).items()}
                for layer, n in sizes.items():
                    per_layer[layer] = max(per_layer.get(layer, 0), n)
                steps.append({"kind": kind, "ms": ms, "peak_over_base_bytes": None if peak is None else peak - base,
                              "held_after_bytes": _held(device) - base if device.startswith("cuda") else None,
                              "cache_bytes_after": sum(sizes.values())})
            st = ditaccel.stats(tr)
        finally:
            ditaccel.remove(tr)
    bound = cache_bytes_per_layer(heads, tokens, block_size, text_tokens=text_tokens)
    measured = [per_layer.get(i, 0) for i in range(layers)]
    res.update(
        steps=steps,
        cache_bytes_per_layer_measured=measured,
        cache_bytes_per_layer_bound=bound,
        cache_bytes_whole_model_measured=max(s["cache_bytes_after"] for s in steps),
        cache_bytes_whole_model_bound=layers * bound,
        cache_bytes_peak_stats=st.cache_bytes_peak,
        within_bound=all(m <= bound for m in measured),
        density=sum(st.details["density_per_layer"]) / layers,
    )
    if res["dense_peak_bytes"] is not None:
        res["adaspa_peak_bytes"] = max(s["peak_over_base_bytes"] for s in steps)
        res["over_dense_bytes"] = res["adaspa_peak_bytes"] - res["dense_peak_bytes"]
        res["over_dense_gib"] = res["over_dense_bytes"] / 2**30
        res["goal_gib"] = GOAL_GIB
        res["meets_goal"] = res["over_dense_gib"] <= GOAL_GIB
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", required=True, help="where to write the result")
    ap.add_argument("--toy", action="store_true", help="tiny transformer and shapes (checks the script on the CPU)")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--block-size", type=int, default=None, help="default 64 (16 with --toy)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation (compiles the kernels)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (use --toy --device cpu to check the script)", file=sys.stderr)
        return 2
    res = measure(args.device, args.toy, args.sparsity, args.block_size, warmup=not args.no_warmup)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    gib = 2**30
    print(f"{res['device']}, {res['tokens']} tokens x {res['heads']} heads, {res['layers']} layers, s={res['sparsity']}, "
          f"block {res['block_size']}: caches {res['cache_bytes_whole_model_measured'] / gib:.3f} GiB measured, "
          f"{res['cache_bytes_whole_model_bound'] / gib:.3f} GiB bound; per layer max "
          f"{max(res['cache_bytes_per_layer_measured']):,} B <= bound {res['cache_bytes_per_layer_bound']:,} B")
    if "over_dense_gib" in res:
        print(f"peak over dense {res['over_dense_gib']:.3f} GiB (goal <= {GOAL_GIB} GiB: "
              f"{'met' if res['meets_goal'] else 'NOT met'}); dense peak {res['dense_peak_bytes'] / gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
