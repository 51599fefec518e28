"""Probe: AdaSpa's block-mass pass with q and k in float8 (e4m3, one scale per tensor) on a GPU.

The search ranks key blocks by their attention mass; it needs the ranking, not 6 digits. Hopper's
tensor cores run e4m3 products at twice the bf16 rate, so the q k^T half of the pass could halve.
For the video-like inputs of the bench (``structured_qkv``, HunyuanVideo-720p shape) this times
the shipped bf16 kernel and the same kernel fed float8 q/k, and compares the masks each selects
(AdaSpa s = 0.8, tiers): the recall of each mask under the exact (bf16) W.

    python scripts/probe_fp8_mass.py --out DIR    # writes DIR/probe_fp8_mass.json
"""

import argparse
import importlib
import json
import os
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from ditaccel.bench import dense_sdpa_context, structured_qkv
from ditaccel.kernels._common import split_head_dim
from ditaccel.methods.adaspa import AdaSpaConfig, recall, select_mask

bm = importlib.import_module("ditaccel.kernels.block_mass")  # the module (the package re-exports a function of that name)


def to_fp8(x):
    """e4m3 with one scale per tensor (the probe's simplest case): x ~= x8 * s."""
    s = float(x.abs().amax().float().clamp_min(1e-12)) / 448.0
    return (x.float() / s).to(torch.float8_e4m3fn), s


def mass_fp8(q8, k8, sq, sk, lse, bs, scale):
    """The shipped kernel's launch (``block_mass._block_mass_triton``, default tiles) fed float8
    q / k, the scales folded into the softmax scale."""
    B, H, L, D = q8.shape
    nb = -(-L // bs)
    W = torch.empty(B, H, nb, nb, dtype=torch.float32, device=q8.device)
    bm_, bn_, w_, st_ = bm._default_config(bs, D)
    d0, d1, split = split_head_dim(D)
    m = torch.empty(1, 1, dtype=torch.uint8, device=q8.device)
    bm._jit_kernel(False)[(triton.cdiv(L, bm_), B * H)](
        q8, k8, lse, m, W, *q8.stride(), *k8.stride(), *lse.stride(), *m.stride(),
        H, L, D, nb, 0, L, scale * sq * sk * bm._LOG2E,
        BS=bs, BLOCK_M=bm_, BLOCK_N=bn_, BLOCK_D0=d0, BLOCK_D1=d1, SPLIT_D=split,
        FULL_K=L % bn_ == 0 and d0 <= D, HAS_MASK=False, EVEN_N=L % bn_ == 0,
        DOT_PRECISION="tf32", UPCAST=False, num_warps=w_, num_stages=st_)
    return W


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--frames", type=int, default=29)
    a = ap.parse_args()
    H, D, bs = 24, 128, 64
    q, k, v = structured_qkv(a.frames, 64, 64, H, D, "cuda", torch.bfloat16)
    L = q.shape[2]
    scale = D**-0.5
    _, lse = bm.attention_with_lse(q, k, v)
    with dense_sdpa_context():
        dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), rep=500, return_mode="median")
    W = bm.block_mass(q, k, lse, block_size=bs)
    t_bf16 = do_bench(lambda: bm.block_mass(q, k, lse, block_size=bs), rep=500, return_mode="median")
    q8, sq = to_fp8(q)
    k8, sk = to_fp8(k)
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "shape": [1, H, L, D],
           "block": bs, "dense_sdpa_ms": dense, "mass_bf16_ms": t_bf16, "mass_bf16_x_dense": t_bf16 / dense}
    try:
        W8 = mass_fp8(q8, k8, sq, sk, lse, bs, scale)
        t_fp8 = do_bench(lambda: mass_fp8(q8, k8, sq, sk, lse, bs, scale), rep=500, return_mode="median")
        t_quant = do_bench(lambda: (to_fp8(q), to_fp8(k)), rep=200, return_mode="median")
        cfg = AdaSpaConfig(sparsity=0.8, block_size=bs)
        m16, _, _ = select_mask(W, cfg, None)
        m8, _, _ = select_mask(W8, cfg, None)
        big = W >= 1e-3 * W.amax(-1, keepdim=True)
        out.update(mass_fp8_ms=t_fp8, mass_fp8_x_dense=t_fp8 / dense, quantize_ms=t_quant,
                   fp8_max_rel=float(((W8 - W).abs() / W.clamp_min(1e-30))[big].max()),
                   fp8_median_rel=float(((W8 - W).abs() / W.clamp_min(1e-30))[big].median()),
                   recall_mask_bf16=float(recall(W, m16).mean()), recall_mask_fp8=float(recall(W, m8).mean()),
                   mask_agreement=float((m16 == m8).float().mean()))
    except Exception as e:  # noqa: BLE001 - report it
        out["fp8_error"] = repr(e)[:500]
    print(json.dumps(out, indent=1))
    with open(os.path.join(a.out, "probe_fp8_mass.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
