"""Where an AdaSpa search's time goes inside the method, at HunyuanVideo-720p size on a GPU.

The kernel bench (`ditaccel bench all --only adaspa-kernels`) times the block mass and the selection
apart; inside HunyuanVideo a cached-LSE search costs about 80 ms a layer more than their sum
(BENCHMARKS.md, "Issue 19, second pass"). This runs the method's own search path,
``AdaSpa._search`` (block mass a few heads per launch with the text mask, ``search_mask``, the
packed mask, the host syncs that record its statistics), on one layer's q / k / v under
``torch.profiler``, and prints the wall time of each search kind and the profiler's table of the
most expensive CUDA and CPU ops; also writes DIR/profile_adaspa_search.json.

    python scripts/profile_adaspa_search.py --out DIR [--frames 29] [--text 256]
    python scripts/profile_adaspa_search.py --device cpu --frames 1 --rows 8 --cols 8 --heads 2   # plumbing
"""

import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ditaccel.bench import structured_qkv
from ditaccel.methods.adaspa import AdaSpa, AdaSpaCache, AdaSpaConfig
from ditaccel.runtime import StepContext


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, default=29)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--text", type=int, default=256, help="text tokens (suffix), 8 of them padded away")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    dev, dtype = a.device, torch.bfloat16 if a.device == "cuda" else torch.float32
    q, k, v = structured_qkv(a.frames, a.rows, a.cols, a.heads, 128 if dev == "cuda" else 32, dev, dtype, a.text)
    L = q.shape[2]
    kpm = torch.ones(1, L, dtype=torch.bool, device=dev)
    if a.text > 8:
        kpm[:, -8:] = False
    cfg = AdaSpaConfig(sparsity=0.8, block_size=64 if dev == "cuda" else 16)
    method = AdaSpa(cfg)
    ctx = StepContext(step=0, timestep=0.0, cond=None, grid=(a.frames * a.rows, a.cols), batch_size=1,
                      text_tokens=a.text, text_position="suffix", frames=a.frames)
    cache = AdaSpaCache()

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
           "tokens": L, "heads": a.heads, "text": a.text, "seconds": {}}
    with torch.no_grad():
        for what in ("search", "research"):  # the first compiles the kernels and fills cache.lse
            method._search(what, ctx, q, k, v, kpm, cache)
            sync()
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                method._search(what, ctx, q, k, v, kpm, cache)
                sync()
                ts.append(time.perf_counter() - t0)
            out["seconds"][what] = sorted(ts)[len(ts) // 2]
            print(f"{what}: {1e3 * out['seconds'][what]:.1f} ms (median of {a.reps})", flush=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            method._search("research", ctx, q, k, v, kpm, cache)
            sync()
    key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    print(table)
    out["profile_table"] = table
    with open(os.path.join(a.out, "profile_adaspa_search.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
