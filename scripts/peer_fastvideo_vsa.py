"""Peer comparison on a GPU: FastVideo's Triton block-sparse kernel (VSA's, 64 x 64 tiles) beside ours
and dense cuDNN SDPA, same masks, same inputs, same run.

FastVideo's ``fastvideo-kernel`` (PyPI 0.3.5) ships the kernel as one plain Triton module,
``fastvideo_kernel/triton_kernels/block_sparse_attn_triton.py``, with its own autotuning (num_stages
2-7 x num_warps 4/8). It is loaded from a path (it is not vendored here):

    python scripts/peer_fastvideo_vsa.py --vsa PATH/block_sparse_attn_triton.py --out DIR

Random per-(head, query-block) masks with the diagonal always kept, at 10% and 20% of the 64-token
blocks, 1 x 24 x 118,784 x 128 bf16 (``structured_qkv``); every output is spot-checked against an fp32
reference on sampled rows before it is timed. Writes DIR/peer_fastvideo_vsa.json.
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tune_tiles import block_rows_mask, spot_check, timed  # noqa: E402

from ditaccel.bench import dense_sdpa_context, structured_qkv  # noqa: E402
from ditaccel.kernels.block_sparse import block_sparse_attention, mask_to_indices  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vsa", required=True, help="path of FastVideo's block_sparse_attn_triton.py")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=118784)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("fastvideo_vsa_triton", a.vsa)
    vsa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vsa)
    H, D, bs, L = 24, 128, 64, a.tokens
    q, k, v = structured_qkv(L // 4096, 64, 64, H, D, "cuda", torch.bfloat16)
    scale = 1 / math.sqrt(D)
    nb = L // bs
    rows = torch.randint(0, L, (64,), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with dense_sdpa_context():
        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), a.reps)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "shape": [1, H, L, D], "block": bs, "dense_sdpa_ms": dense, "rows": []}
    sizes = torch.full((nb,), bs, dtype=torch.int32, device="cuda")
    for keep in (0.1, 0.2):
        mask = (torch.rand(1, H, nb, nb, device="cuda", generator=g) < keep) | torch.eye(nb, dtype=torch.bool, device="cuda")
        idx, cnt = mask_to_indices(mask)
        tm = block_rows_mask(mask, rows, bs, L)
        row = {"keep": keep, "density": float(mask.float().mean())}
        for name, fn in (
            ("ditaccel", lambda: block_sparse_attention(q, k, v, idx, cnt, block_size=bs, validate=False)),
            ("fastvideo_triton", lambda: vsa.triton_block_sparse_attn_forward(q, k, v, idx, cnt, sizes)[0]),
        ):
            try:
                err = spot_check(fn(), q, k, v, tm, rows, scale)
                ms = timed(fn, a.reps)
                row[name] = {"ms": ms, "speedup": dense / ms, "max_err": err}
            except Exception as e:  # noqa: BLE001 - report it
                row[name] = {"error": repr(e)[:300]}
            print(json.dumps({"keep": keep, name: row[name]}), flush=True)
        out["rows"].append(row)
    with open(os.path.join(a.out, "peer_fastvideo_vsa.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
