"""Sweep the block-mass Triton kernel's tiles on the GPU (prints a table, best first).

    python scripts/tune_block_mass.py [--tokens 32768] [--heads 24] [--head-dim 128] [--block 64]
"""

import argparse
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from ditaccel.bench import dense_sdpa_context
from ditaccel.kernels.block_mass import _block_mass_triton, _default_config, attention_with_lse, block_mass_reference

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=32768)
ap.add_argument("--heads", type=int, default=24)
ap.add_argument("--head-dim", type=int, default=128)
ap.add_argument("--block", type=int, default=64)
a = ap.parse_args()
q, k, v = (torch.randn(1, a.heads, a.tokens, a.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
_, lse = attention_with_lse(q, k, v)
scale = a.head_dim**-0.5
with dense_sdpa_context():
    dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=25, rep=200, return_mode="median")
ref = block_mass_reference(q[:, :2, :4096], k[:, :2, :4096], lse[:, :2, :4096], block_size=a.block)
rows = []
for bm, bn, nw, ns in itertools.product((64, 128, 256), (64, 128), (4, 8), (2, 3, 4)):
    if bm % a.block or bn % a.block:
        continue
    try:
        fn = lambda: _block_mass_triton(q, k, lse, a.block, scale, None, bm, bn, nw, ns)  # noqa: E731
        small = _block_mass_triton(q[:, :2, :4096], k[:, :2, :4096], lse[:, :2, :4096], a.block, scale, None,
                                   bm, bn, nw, ns)
        err = ((small - ref).abs().max() / ref.abs().max()).item()
        rows.append((do_bench(fn, warmup=10, rep=100, return_mode="median"), bm, bn, nw, ns, err))
    except Exception as e:  # out of resources etc.
        rows.append((float("inf"), bm, bn, nw, ns, repr(e)[:60]))
rows.sort(key=lambda r: r[0])
print(f"block mass, 1 x {a.heads} x {a.tokens} x {a.head_dim} bf16, block {a.block}; dense SDPA {dense:.2f} ms; "
      f"default config {_default_config(a.block, a.head_dim)}")
for ms, bm, bn, nw, ns, err in rows[:12]:
    print(f"  BLOCK_M={bm:3d} BLOCK_N={bn:3d} warps={nw} stages={ns}: {ms:8.2f} ms ({ms / dense:.2f}x dense) "
          f"err {err if isinstance(err, str) else f'{err:.1e}'}")
