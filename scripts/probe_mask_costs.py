"""What a key-padding mask and a ragged length cost AdaSpa's kernels, at HunyuanVideo-720p size on a GPU.

Inside HunyuanVideo (BENCHMARKS.md, "Issue 19, third pass") a step whose attention returns the LSE cost
1.31x a dense step, and the searches and sparse steps more than the kernel bench's parts. diffusers
passes the model's text mask on every call, all True for the bench's inputs; until this change the
methods handed it to their kernels. This times, on one layer's q / k / v (1 x 24 x 119,056 x 128 bf16:
118,784 video + 272 text tokens, not a multiple of 64), each kernel with no mask, with an all-True mask
and with 8 padded text keys:

- dense SDPA (cuDNN first) without and with diffusers' [B, 1, 1, L] boolean mask;
- ``attention_with_lse`` (cuDNN with the mask as an additive bias);
- ``block_mass``, the ragged last key tile in its own launch (``split_tail``, shipped) or not;
- ``block_sparse_attention`` on an s = 0.8 tiers mask (decoded by ``PackedMask.kernel_lists``, timed
  apart) and AdaSpa's whole sparse call (``AdaSpa._core``), the difference being the method's overhead.

    python scripts/probe_mask_costs.py --out DIR      # writes DIR/probe_mask_costs.json
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tune_tiles import timed  # noqa: E402

from ditaccel.bench import dense_sdpa_context, structured_qkv  # noqa: E402
from ditaccel.kernels.block_mass import _block_mass_triton, attention_with_lse  # noqa: E402
from ditaccel.kernels.block_sparse import block_sparse_attention  # noqa: E402
from ditaccel.methods.adaspa import AdaSpa, AdaSpaCache, AdaSpaConfig  # noqa: E402
from ditaccel.runtime import StepContext  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--frames", type=int, default=29)
    ap.add_argument("--text", type=int, default=272)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    dev, H, D, bs = "cuda", 24, 128, 64
    q, k, v = structured_qkv(a.frames, 64, 64, H, D, dev, torch.bfloat16, a.text)
    L = q.shape[2]
    masks = {"none": None, "all_true": torch.ones(1, L, dtype=torch.bool, device=dev)}
    masks["padded"] = masks["all_true"].clone()
    masks["padded"][:, -8:] = False
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "shape": [1, H, L, D], "text": a.text, "block": bs, "ms": {}}

    def rec(name, fn):
        out["ms"][name] = timed(fn, a.reps, warmup=1)
        print(json.dumps({name: round(out["ms"][name], 2)}), flush=True)
        with open(os.path.join(a.out, "probe_mask_costs.json"), "w") as f:
            json.dump(out, f, indent=1)

    with torch.no_grad():
        with dense_sdpa_context():
            rec("sdpa", lambda: F.scaled_dot_product_attention(q, k, v))
            m4 = masks["all_true"][:, None, None, :]
            rec("sdpa_all_true_mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m4))
        for name, m in masks.items():
            rec(f"attention_with_lse_{name}", lambda m=m: attention_with_lse(q, k, v, key_padding_mask=m))
        _, lse = attention_with_lse(q, k, v)
        for name in ("none", "padded"):
            for split in (True, False):
                rec(f"block_mass_{name}_split_{split}",
                    lambda m=masks[name], s=split: _block_mass_triton(q, k, lse, bs, D ** -0.5, m, split_tail=s))
        # AdaSpa's own search and sparse call (s = 0.8, tiers), then the kernel on the same lists
        ctx = StepContext(step=0, timestep=0.0, cond=None, grid=(a.frames * 64, 64), batch_size=1,
                          text_tokens=a.text, text_position="suffix", frames=a.frames)
        method = AdaSpa(AdaSpaConfig(sparsity=0.8, block_size=bs))
        for name in ("none", "padded"):
            cache, m = AdaSpaCache(), masks[name]
            method._search("search", ctx, q, k, v, m, cache)
            rec(f"research_{name}", lambda m=m, c=cache: method._search("research", ctx, q, k, v, m, c))
            idx, cnt, dense = cache.mask.kernel_lists()
            out[f"density_{name}"] = float(cache.density.mean())
            rec(f"kernel_lists_{name}", lambda c=cache: c.mask.kernel_lists())
            rec(f"block_sparse_{name}", lambda m=m, i=idx, n=cnt, d=dense: block_sparse_attention(
                q, k, v, i, n, block_size=bs, key_padding_mask=m, validate=False, dense_query_blocks=d))
            rec(f"adaspa_sparse_call_{name}",
                lambda m=m, c=cache: method._core("sparse", ctx, q, k, v, m, c, {}))
            del idx, cnt, cache


if __name__ == "__main__":
    main()
