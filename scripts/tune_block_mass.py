"""Time the block-mass Triton kernel's variants and tiles on the GPU, next to dense SDPA.

    python scripts/tune_block_mass.py --out DIR [--shapes 1x24x115200x128,2x16x16384x72] [--block 64]
                                     [--variants f32/rows,f16/dot ...] [--configs 128x128x8x2 ...]

For each shape (bf16, query/key block ``--block``; default AdaSpa's HunyuanVideo-720p shape
1 x 24 x 115,200 x 128 and the DiT/PixArt shape 2 x 16 x 16,384 x 72), with video-like attention
(``ditaccel.bench.structured_qkv``: local and global heads, so ``W`` spans many orders of
magnitude) and its fresh LSE:

1. the ``exp/reduction`` variants (``--variants``; default: each exp with keys-first sums, each
   reduction with the float32 exp, and f16 / dot) at the default tiles; on later shapes only the
   first shape's ``--keep`` fastest, then
2. the fastest variant that passed its check over a small grid of tiles (``--configs``,
   ``BLOCK_MxBLOCK_NxWARPSxSTAGES``).

Each case is first checked against an exact float64 reference on a few query blocks (all heads,
all keys): ``max_rel`` is the largest relative error over entries >= 1e-3 of their row's max,
``row_rel`` the largest relative error of a row sum. A case passes with both <= 1e-2; a failing
case is reported and not timed. Times are ``triton.testing.do_bench`` medians, dense SDPA runs
under ``dense_sdpa_context()`` (cuDNN first) in the same process. Writes
``DIR/tune_block_mass.json`` and prints a table per shape, fastest first. About 2 minutes on an
H100 with the defaults (23 timed cases).
"""

import argparse
import datetime
import json
import math
import os

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from ditaccel.bench import dense_sdpa_context, structured_qkv
from ditaccel.kernels.block_mass import (
    _EXPS,
    _REDUCTIONS,
    _block_mass_triton,
    _default_config,
    _default_variant,
    attention_with_lse,
)

# L -> (frames, rows, cols) of its structured_qkv video (other L: one row of L tokens)
VIDEO = {115200: (32, 45, 80), 16384: (16, 32, 32)}
DEFAULT_VARIANTS = ",".join(
    [f"{e}/keys" for e in _EXPS] + [f"f32/{r}" for r in _REDUCTIONS if r != "keys"] + ["f16/dot"]
)
# phase 2 tiles (the default config is timed in phase 1 already and skipped here)
DEFAULT_CONFIGS = "128x128x8x2,128x64x8x3,256x64x8x2,256x64x8x4,256x128x8x2,256x64x4x3"
TOL = 1e-2


def make_inputs(B, H, L, D):
    """q, k, v bf16 (B, H, L, D) with structured attention, and the fresh natural-log LSE."""
    frames, rows, cols = VIDEO.get(L, (1, 1, L))
    qs, ks, vs = zip(*(structured_qkv(frames, rows, cols, H, D, "cuda", torch.bfloat16, seed=b) for b in range(B)))
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    _, lse = attention_with_lse(q, k, v)
    return q, k, v, lse


def reference_rows(q, k, lse, bs, scale, blocks):
    """Exact W[:, :, blocks, :] (float64), one (batch, head) at a time."""
    B, H, L, D = q.shape
    nb = -(-L // bs)
    rows = torch.cat([torch.arange(p * bs, min(L, (p + 1) * bs), device=q.device) for p in blocks])
    out = torch.empty(B, H, len(blocks), nb, dtype=torch.float64, device=q.device)
    block_of_row = torch.cat([torch.full((min(L, (p + 1) * bs) - p * bs,), i, device=q.device)
                              for i, p in enumerate(blocks)])
    for b in range(B):
        for h in range(H):
            s = q[b, h, rows].double() @ k[b, h].double().T * scale
            p = torch.exp(s - lse[b, h, rows].double()[:, None])
            p = F.pad(p, (0, nb * bs - L)).view(len(rows), nb, bs).sum(-1)
            out[b, h] = torch.zeros(len(blocks), nb, dtype=torch.float64, device=q.device).index_add_(
                0, block_of_row, p)
    return out


def check(W, ref, blocks):
    """(max_rel, row_rel) of ``W``'s rows ``blocks`` against their reference."""
    got = W[:, :, blocks].double()
    big = ref >= 1e-3 * ref.amax(-1, keepdim=True)
    max_rel = float(((got - ref).abs() / ref.clamp_min(1e-300))[big].max())
    row_rel = float(((got.sum(-1) - ref.sum(-1)).abs() / ref.sum(-1)).max())
    return max_rel, row_rel


def parse_config(s):
    """"256x64x8x3" -> (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    block_m, block_n, warps, stages = (int(x) for x in s.split("x"))
    return block_m, block_n, warps, stages


def run_case(q, k, lse, bs, scale, ref, blocks, exp, reduction, cfg, rep):
    """Check one (variant, tiles) case, then time it if it passed."""
    case = {"exp": exp, "reduction": reduction, "block_m": cfg[0], "block_n": cfg[1], "num_warps": cfg[2],
            "num_stages": cfg[3]}
    fn = lambda: _block_mass_triton(q, k, lse, bs, scale, None, *cfg, exp=exp, reduction=reduction)  # noqa: E731
    try:
        W = fn()
        torch.cuda.synchronize()
    except Exception as e:  # out of shared memory / registers etc.
        return {**case, "ms": None, "error": repr(e)[:200]}
    case["max_rel"], case["row_rel"] = check(W, ref, blocks)
    case["ok"] = case["max_rel"] <= TOL and case["row_rel"] <= TOL
    del W
    case["ms"] = do_bench(fn, warmup=1, rep=rep, return_mode="median") if case["ok"] else None
    return case


def tune_shape(B, H, L, D, bs, variants, configs, rep):
    """Dense SDPA, the variants at the default tiles, the fastest one over ``configs``."""
    q, k, v, lse = make_inputs(B, H, L, D)
    scale = D**-0.5
    nb = -(-L // bs)
    blocks = sorted({0, nb // 3, nb // 2, nb - 1})
    ref = reference_rows(q, k, lse, bs, scale, blocks)
    with dense_sdpa_context():
        dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=1, rep=rep, return_mode="median")
    default_cfg = _default_config(bs, D)
    cases = []
    for var in variants:
        exp, reduction = var.split("/")
        cases.append(run_case(q, k, lse, bs, scale, ref, blocks, exp, reduction, default_cfg, rep))
        print(fmt(cases[-1], dense), flush=True)
    timed = [c for c in cases if c["ms"] is not None]
    if timed:
        best = min(timed, key=lambda c: c["ms"])
        for cfg in configs:
            if cfg == default_cfg or cfg[0] % bs or cfg[1] % bs:
                continue
            cases.append(run_case(q, k, lse, bs, scale, ref, blocks, best["exp"], best["reduction"], cfg, rep))
            print(fmt(cases[-1], dense), flush=True)
    for c in cases:
        c["x_dense"] = c["ms"] / dense if c["ms"] is not None else None
    cases.sort(key=lambda c: math.inf if c["ms"] is None else c["ms"])
    return {"shape": [B, H, L, D], "block": bs, "dense_ms": dense, "default_config": list(default_cfg),
            "default_variant": list(_default_variant(q.dtype)), "check_blocks": blocks, "cases": cases}


def fmt(c, dense):
    name = f"{c['exp']}/{c['reduction']:<4} {c['block_m']:3d}x{c['block_n']:<3d} w{c['num_warps']} s{c['num_stages']}"
    if "error" in c:
        return f"  {name}: error {c['error'][:80]}"
    acc = f"max_rel {c['max_rel']:.1e} row_rel {c['row_rel']:.1e}"
    if c["ms"] is None:
        return f"  {name}: FAILED CHECK ({acc})"
    return f"  {name}: {c['ms']:8.2f} ms  {c['ms'] / dense:.3f}x dense  {acc}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for tune_block_mass.json")
    ap.add_argument("--shapes", default="1x24x115200x128,2x16x16384x72", help="BxHxLxD, comma-separated")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="exp/reduction, comma-separated")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="BLOCK_MxBLOCK_NxWARPSxSTAGES, comma-separated")
    ap.add_argument("--keep", type=int, default=3, help="variants of the first shape timed on later shapes")
    ap.add_argument("--rep", type=int, default=1000, help="do_bench time budget per case (ms)")
    a = ap.parse_args()
    variants = a.variants.split(",")
    configs = [parse_config(s) for s in a.configs.split(",")] if a.configs else []
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.date.today().isoformat(), "dtype": "bfloat16", "tolerance": TOL, "shapes": []}
    for shape in a.shapes.split(","):
        B, H, L, D = (int(x) for x in shape.split("x"))
        print(f"{B} x {H} x {L} x {D} bf16, block {a.block}", flush=True)
        result["shapes"].append(tune_shape(B, H, L, D, a.block, variants, configs, a.rep))
        # later shapes: only the first shape's fastest variants
        ranked = [f"{c['exp']}/{c['reduction']}" for c in result["shapes"][0]["cases"] if c["ms"] is not None]
        variants = list(dict.fromkeys(ranked))[: a.keep] or variants
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "tune_block_mass.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']}")
    for r in result["shapes"]:
        B, H, L, D = r["shape"]
        print(f"{B} x {H} x {L} x {D} bf16, block {r['block']}: dense SDPA {r['dense_ms']:.2f} ms; "
              f"default {'/'.join(r['default_variant'])} {r['default_config']}")
        for c in r["cases"]:
            print(fmt(c, r["dense_ms"]))


if __name__ == "__main__":
    main()
