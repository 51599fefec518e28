"""Reproduce a Triton 3.6 miscompile on an H100: the tile kernel's 64 + 16 head-dim split (D = 72)
with masked *pointer* loads gives NaN (or an illegal address), while the same kernel with
tensor-descriptor (TMA) loads is correct. Hence ``tile_attention`` splits head dims only with TMA.

    python scripts/repro_tiles.py V0       # current kernel, pointer loads: NaN on Triton 3.6
    python scripts/repro_tiles.py V0tma    # current kernel, TMA loads: correct
    python scripts/repro_tiles.py V3_notma_code   # the TMA code removed from the source: still NaN

Each variant runs in its own process (a faulting kernel poisons the CUDA context).
"""

import importlib.util, inspect, math, os, re, sys, tempfile, textwrap
import torch
from ditaccel.kernels import tiles
from ditaccel.kernels.window import WindowSpec, window_tiles, window_attention_reference

src = textwrap.dedent(inspect.getsource(tiles._tile_attn_kernel))
no_tma = re.sub(r"    if USE_TMA:  # K/V tiles.*?\n\n", "\n", src, flags=re.S)
no_tma = no_tma.replace("        if USE_TMA:\n            k0 = kd0.load([kb * BLOCK_N, 0])\n        elif FAST_KV:", "        if FAST_KV:")
no_tma = no_tma.replace("        if USE_TMA:\n            v0 = vd0.load([kb * BLOCK_N, 0])\n        elif FAST_KV:", "        if FAST_KV:")
no_tma = no_tma.replace("            if USE_TMA:\n                k1 = kd1.load([kb * BLOCK_N, BLOCK_D0])\n            else:\n                k1 = tl.load(k_base + k_rows * stride_km + offs_d1[None, :] * stride_kd,\n                             mask=k_ok[:, None] & d1_ok[None, :], other=0.0)",
                        "            k1 = tl.load(k_base + k_rows * stride_km + offs_d1[None, :] * stride_kd,\n                         mask=k_ok[:, None] & d1_ok[None, :], other=0.0)")
no_tma = no_tma.replace("            if USE_TMA:\n                v1 = vd1.load([kb * BLOCK_N, BLOCK_D0])\n            else:\n                v1 = tl.load(v_base + k_rows * stride_vm + offs_d1[None, :] * stride_vd,\n                             mask=k_ok[:, None] & d1_ok[None, :], other=0.0)",
                        "            v1 = tl.load(v_base + k_rows * stride_vm + offs_d1[None, :] * stride_vd,\n                         mask=k_ok[:, None] & d1_ok[None, :], other=0.0)")
print("tma refs left in no_tma:", no_tma.count("kd0") + no_tma.count("vd1"))
variants = {"V0": (src, False), "V0tma": (src, True), "V3_notma_code": (no_tma, False)}
name = sys.argv[1]
code, tma = variants[name]
path = os.path.join(tempfile.mkdtemp(), f"k_{name}.py")
with open(path, "w") as f:
    f.write("import triton\nimport triton.language as tl\n\n" + code)
spec_ = importlib.util.spec_from_file_location(f"k_{name}", path)
mod = importlib.util.module_from_spec(spec_)
spec_.loader.exec_module(mod)
tiles._tile_attn_kernel = mod._tile_attn_kernel
tiles._kernel.cache_clear()
dev = "cuda"
q, k, v = (torch.randn(2, 4, 1024, 72, device=dev, dtype=torch.bfloat16) for _ in range(3))
spec = WindowSpec.paper_default((32, 32))
t = window_tiles(spec, "inside", 64, 64, dev)
r = window_attention_reference(q, k, v, spec)
try:
    o = tiles.tile_attention(q, k, v, t, scale=1 / math.sqrt(72), window=spec, configs=((4, 2),), tma=tma)
    torch.cuda.synchronize()
    print("OK", name, (o.float() - r.float()).abs().max().item(), flush=True)
except Exception as e:
    print("FAIL", name, str(e)[:150], flush=True)
