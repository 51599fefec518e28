"""Time the tile kernel (kernels/tiles.py) on a GPU: tile shapes x (num_warps, num_stages) for
block-sparse (AdaSpa), window, full + window and all tiles (dense), next to dense SDPA
(cuDNN first) and compiled FlexAttention with the same masks, each output spot-checked
against an fp32 reference before it is timed.

    python scripts/tune_tiles.py --out DIR [--only sparse,window,variants]

``variants`` times source variants of the kernel's key loop (Triton's ``warp_specialize``, loop
pipelining with ``tl.range(num_stages=...)``) on the block-sparse case, each loaded from a patched
copy of kernels/tiles.py, spot-checked, beside the shipped kernel and dense cuDNN.

Writes DIR/tune_tiles.json and prints one line per case. Used to choose the defaults in
kernels/tiles.py (CONFIGS), block_sparse.py (query_blocks) and window.py (tile size).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ditaccel.bench import dense_sdpa_context, structured_qkv
from ditaccel.kernels.block_mass import attention_with_lse, block_mass
from ditaccel.kernels.block_sparse import block_sparse_attention, mask_to_indices, tile_list
from ditaccel.kernels.tiles import CONFIGS, TileList, tile_attention
from ditaccel.kernels.window import WindowSpec, window_attention, window_dense_mask, window_tiles
from ditaccel.methods.adaspa import AdaSpaConfig, select_mask

RESULTS: list[dict] = []


def configs_for(block_m):
    """The (num_warps, num_stages) worth timing for a tile height (the others lost by 1.3-2x)."""
    return [c for c in CONFIGS if c[0] == (8 if block_m >= 128 else 4)]


def timed(fn, reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def record(**kw):
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def spot_check(out, q, k, v, token_mask_rows, rows, scale, tol=3e-2):
    """Compare ``out[0, :, rows]`` with fp32 attention under ``token_mask_rows`` ((H, R, L) bool)."""
    s = torch.einsum("hrd,hld->hrl", q[0, :, rows].float(), k[0].float()) * scale
    s = s.masked_fill(~token_mask_rows, float("-inf"))
    ref = torch.einsum("hrl,hld->hrd", torch.softmax(s, -1), v[0].float())
    err = (out[0, :, rows].float() - ref).abs().max().item()
    if not err < tol:
        raise AssertionError(f"spot check failed: max abs err {err}")
    return err


def block_rows_mask(blocks, rows, bs, L):
    """(H, R, L) token mask of block mask ``blocks`` (1, H, NB, NB) for query ``rows``."""
    tok = torch.arange(L, device=blocks.device) // bs
    return blocks[0][:, rows // bs][:, :, tok]


def sparse_cases(L, H, D, reps):
    dev = "cuda"
    frames = L // 4096
    q, k, v = structured_qkv(frames, 64, 64, H, D, dev, torch.bfloat16)
    scale = 1 / math.sqrt(D)
    with dense_sdpa_context():
        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    record(case="dense_sdpa", L=L, H=H, D=D, ms=dense)
    _, lse = attention_with_lse(q, k, v)
    rows = torch.randint(0, L, (64,), device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    for bs in (64, 128):
        nb = -(-L // bs)
        W = block_mass(q, k, lse, block_size=bs)
        for keep in (0.2, 0.1):
            rnd = torch.rand(1, H, nb, nb, device=dev, generator=g) < keep
            rnd |= torch.eye(nb, dtype=torch.bool, device=dev)
            struct, _, _ = select_mask(W, AdaSpaConfig(sparsity=1 - keep, block_size=bs), None)
            for kind, mask in (("random", rnd), ("adaspa", struct)):
                idx, cnt = mask_to_indices(mask)
                density = float(mask.float().mean())
                tm = block_rows_mask(mask, rows, bs, L)
                for qb, tma in ((1, False), (1, True)):
                    tiles = tile_list(idx, cnt, bs, qb)
                    visited = float(tiles.counts.float().sum()) * tiles.block_m * tiles.block_n / (H * L * L)
                    for cfg in configs_for(tiles.block_m):
                        fn = lambda: tile_attention(q, k, v, tiles, scale=scale, configs=(cfg,), tma=tma)  # noqa: E731
                        try:
                            err = spot_check(fn(), q, k, v, tm, rows, scale)
                            ms = timed(fn, reps)
                        except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of shared memory)
                            record(case="sparse", bs=bs, mask=kind, keep=keep, tma=tma, cfg=cfg, error=str(e)[:200])
                            continue
                        record(case="sparse", bs=bs, mask=kind, keep=keep, density=density, visited=visited,
                               query_blocks=qb, tma=tma, cfg=cfg, ms=ms, speedup=dense / ms, err=err)
                fn = lambda: block_sparse_attention(q, k, v, idx, cnt, block_size=bs, backend="flex", validate=False)  # noqa: E731
                try:
                    err = spot_check(fn(), q, k, v, tm, rows, scale)
                    ms = timed(fn, reps)
                    record(case="sparse_flex", bs=bs, mask=kind, keep=keep, density=density, ms=ms,
                           speedup=dense / ms, err=err)
                except Exception as e:  # noqa: BLE001
                    record(case="sparse_flex", bs=bs, mask=kind, keep=keep, error=str(e)[:200])
    # dense through the tile kernel, with LSE, and with the block mass against a previous LSE
    for bs in (128,):
        nb = -(-L // bs)
        full = torch.arange(nb, device=dev, dtype=torch.int32).expand(1, nb, nb).contiguous()
        tiles = TileList(full, torch.full((1, nb), nb, dtype=torch.int32, device=dev), None, bs, bs, nb)
        for cfg, tma in [(c, t) for c in configs_for(bs) for t in (False, True)]:
            for what in ("out", "out+lse"):
                kw = dict(scale=scale, configs=(cfg,), return_lse=what != "out", tma=tma)
                try:
                    ms = timed(lambda: tile_attention(q, k, v, tiles, **kw), reps)
                except Exception as e:  # noqa: BLE001
                    record(case="dense_tiles", what=what, cfg=cfg, tma=tma, error=str(e)[:200])
                    continue
                record(case="dense_tiles", what=what, bs=bs, cfg=cfg, tma=tma, ms=ms, vs_dense=ms / dense)
    ms = timed(lambda: block_mass(q, k, lse, block_size=64), reps)
    record(case="block_mass_current", ms=ms, vs_dense=ms / dense)


def window_cases(reps):
    dev = "cuda"
    B, H, L, D = 2, 16, 16384, 72
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    scale = 1 / math.sqrt(D)
    spec = WindowSpec.paper_default((128, 128))
    rows = torch.randint(0, L, (64,), device=dev)
    tm = window_dense_mask(spec, dev)[rows][None].expand(H, -1, -1)
    q1, k1, v1 = q[:1], k[:1], v[:1]
    with dense_sdpa_context():
        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), reps * 5)
    record(case="window_dense_sdpa", ms=dense)
    flex = timed(lambda: window_attention(q, k, v, spec, backend="flex"), reps * 5)
    record(case="window_flex", ms=flex, speedup=dense / flex)
    for bs in (128, 64):
        for cfg, tma in [(c, t) for c in configs_for(bs) for t in (False, True)]:
            tiles = window_tiles(spec, "inside", bs, bs, dev)
            fn = lambda: tile_attention(q, k, v, tiles, scale=scale, window=spec, configs=(cfg,), tma=tma)  # noqa: E731
            try:
                err = spot_check(fn()[:1], q1, k1, v1, tm, rows, scale)
                ms = timed(fn, reps * 5)
            except Exception as e:  # noqa: BLE001
                record(case="window", bs=bs, cfg=cfg, tma=tma, error=str(e)[:200])
                continue
            record(case="window", bs=bs, cfg=cfg, tma=tma, ms=ms, speedup=dense / ms, err=err)
            outside = window_tiles(spec, "outside", bs, bs, dev)

            def both():
                ow, lw = tile_attention(q, k, v, tiles, scale=scale, window=spec, return_lse=True, configs=(cfg,),
                                        tma=tma)
                return tile_attention(q, k, v, outside, scale=scale, window=spec, init=(ow, lw), configs=(cfg,),
                                      tma=tma), ow

            try:
                of, _ = both()
                err = spot_check(of[:1], q1, k1, v1, torch.ones_like(tm), rows, scale)
                ms = timed(both, reps * 5)
            except Exception as e:  # noqa: BLE001
                record(case="full_and_window", bs=bs, cfg=cfg, tma=tma, error=str(e)[:200])
                continue
            record(case="full_and_window", bs=bs, cfg=cfg, tma=tma, ms=ms, vs_dense=ms / dense, err=err)
        nb = -(-L // bs)
        full = torch.arange(nb, device=dev, dtype=torch.int32).expand(1, nb, nb).contiguous()
        tiles = TileList(full, torch.full((1, nb), nb, dtype=torch.int32, device=dev), None, bs, bs, nb)
        for cfg, tma in [(c, t) for c in configs_for(bs) for t in (False, True)]:
            try:
                ms = timed(lambda: tile_attention(q, k, v, tiles, scale=scale, configs=(cfg,), tma=tma), reps * 5)
            except Exception as e:  # noqa: BLE001
                record(case="window_shape_dense_tiles", bs=bs, cfg=cfg, tma=tma, error=str(e)[:200])
                continue
            record(case="window_shape_dense_tiles", bs=bs, cfg=cfg, tma=tma, ms=ms, vs_dense=ms / dense)


#: kernel-source variants: (old, new) replacements in kernels/tiles.py
LOOP = "for j in range(0, cnt):"
VARIANTS = {
    "shipped": [],
    "warp_specialize": [(LOOP, "for j in tl.range(0, cnt, warp_specialize=True):")],
    "loop_stages2": [(LOOP, "for j in tl.range(0, cnt, num_stages=2):")],
    "loop_stages3": [(LOOP, "for j in tl.range(0, cnt, num_stages=3):")],
    "ws_stages3": [(LOOP, "for j in tl.range(0, cnt, num_stages=3, warp_specialize=True):")],
}


def load_variant(name: str):
    """kernels/tiles.py with VARIANTS[name] applied, imported as a sibling module (its relative imports work)."""
    import importlib.util
    import inspect
    import tempfile

    from ditaccel.kernels import tiles as shipped

    src = inspect.getsource(shipped)
    for old, new in VARIANTS[name]:
        assert src.count(old) == 1, old
        src = src.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(), f"tiles_{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"ditaccel.kernels.tiles_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def variant_cases(L, H, D, reps):
    dev = "cuda"
    q, k, v = structured_qkv(L // 4096, 64, 64, H, D, dev, torch.bfloat16)
    scale = 1 / math.sqrt(D)
    with dense_sdpa_context():
        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    record(case="variants_dense_sdpa", L=L, H=H, D=D, ms=dense)
    rows = torch.randint(0, L, (64,), device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    mods = {}
    for name in VARIANTS:  # each patched module once: its kernels compile once per shape, not per mask
        try:
            mods[name] = load_variant(name)
        except Exception as e:  # noqa: BLE001 - record and go on
            record(case="variant", variant=name, error=str(e)[:300])
    for bs in (64, 128):
        nb = -(-L // bs)
        for keep in (0.1, 0.2):
            mask = (torch.rand(1, H, nb, nb, device=dev, generator=g) < keep) | torch.eye(nb, dtype=torch.bool, device=dev)
            idx, cnt = mask_to_indices(mask)
            tiles = tile_list(idx, cnt, bs, 1)
            tm = block_rows_mask(mask, rows, bs, L)
            for (name, mod), cfg in itertools.product(mods.items(), configs_for(tiles.block_m)):
                fn = lambda: mod.tile_attention(q, k, v, tiles, scale=scale, configs=(cfg,))  # noqa: E731
                try:
                    err = spot_check(fn(), q, k, v, tm, rows, scale)
                    ms = timed(fn, reps)
                except Exception as e:  # noqa: BLE001 - record and go on
                    record(case="variant", variant=name, bs=bs, keep=keep, cfg=cfg, error=str(e)[:300])
                    continue
                record(case="variant", variant=name, bs=bs, keep=keep, cfg=cfg, ms=ms, speedup=dense / ms,
                       err=err, density=float(mask.float().mean()))
    # all tiles (dense): the rate each variant reaches with no sparsity overhead, with and without the LSE
    for bm_, bn_ in ((128, 64), (128, 128)):
        nb = -(-L // bn_)
        nqt = -(-L // bm_)
        full = torch.arange(nb, device=dev, dtype=torch.int32).expand(1, nqt, nb).contiguous()
        tiles = TileList(full, torch.full((1, nqt), nb, dtype=torch.int32, device=dev), None, bm_, bn_, nb)
        for (name, mod), cfg, lse in itertools.product(mods.items(), configs_for(bm_), (False, True)):
            fn = lambda: mod.tile_attention(q, k, v, tiles, scale=scale, configs=(cfg,), return_lse=lse)  # noqa: E731
            try:
                ms = timed(fn, max(3, reps // 3))
            except Exception as e:  # noqa: BLE001 - record and go on
                record(case="variant_dense", variant=name, tiles=[bm_, bn_], cfg=cfg, lse=lse, error=str(e)[:300])
                continue
            record(case="variant_dense", variant=name, tiles=[bm_, bn_], cfg=cfg, lse=lse, ms=ms, vs_dense=ms / dense)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="sparse,window")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=118784)
    args = ap.parse_args()
    t0 = time.time()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(meta))
    only = args.only.split(",")
    try:
        if "window" in only:
            window_cases(args.reps)
        if "sparse" in only:
            sparse_cases(args.tokens, 24, 128, args.reps)
        if "variants" in only:
            variant_cases(args.tokens, 24, 128, args.reps)
    finally:
        with open(os.path.join(args.out, "tune_tiles.json"), "w") as f:
            json.dump({"meta": meta, "seconds": time.time() - t0, "results": RESULTS}, f, indent=1)


if __name__ == "__main__":
    main()
