"""The tile kernel (kernels/tiles.py) against its PyTorch reference, under the Triton interpreter."""

import functools
import math

import pytest
import torch

from ditaccel.kernels.tiles import (
    SKIP_BOTTOM,
    SKIP_TOP,
    TileList,
    compact_columns,
    tile_attention,
    tile_attention_reference,
)
from ditaccel.kernels.window import WindowSpec

triton = pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _interpret(request, monkeypatch):
    if request.node.name.startswith("test_cuda"):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels on the GPU
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # per test: the kernel reads it at launch
    if _interpreter_problem():
        pytest.skip(_interpreter_problem())


@functools.lru_cache(maxsize=None)
def _interpreter_problem():
    """Triton 3.6's interpreter cannot take a loaded scalar as a loop bound (fixed later)."""
    q = torch.zeros(1, 1, 16, 16)
    t = TileList(torch.zeros(1, 1, 1, dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32), None, 16, 16)
    try:
        tile_attention(q, q, q, t, scale=1.0)
    except Exception as e:  # noqa: BLE001
        if "0-dimensional" in str(e):
            return f"this Triton's interpreter cannot run the kernel ({triton.__version__})"
    return None


def random_tiles(G, L, bm, bn, seed, flag_values=(0,)):
    g = torch.Generator().manual_seed(seed)
    nqt, nkt = -(-L // bm), -(-L // bn)
    idx = torch.stack([torch.stack([torch.randperm(nkt, generator=g) for _ in range(nqt)]) for _ in range(G)])
    cnt = torch.randint(0, nkt + 1, (G, nqt), generator=g, dtype=torch.int32)
    vals = torch.tensor(flag_values, dtype=torch.uint8)
    flags = vals[torch.randint(0, len(flag_values), (G, nqt, nkt), generator=g)]
    return TileList(idx.int(), cnt, flags if len(flag_values) > 1 else None, bm, bn)


def qkv(B, H, L, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(3)]


def check(out, lse, ref_out, ref_lse, atol):
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=atol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("L, D, bm, bn, shared, dtype, tma", [
    (100, 64, 32, 16, False, torch.float32, False),
    (97, 72, 32, 32, True, torch.float32, False),
    (130, 128, 64, 32, False, torch.float32, True),  # K/V through tensor descriptors
    (100, 72, 64, 64, False, torch.bfloat16, True),
    (64, 40, 16, 16, True, torch.float16, False),
])
def test_random_lists_with_half_row_flags(L, D, bm, bn, shared, dtype, tma):
    B, H = 2, 2
    q, k, v = qkv(B, H, L, D, dtype, seed=L + D)
    tiles = random_tiles(1 if shared else B * H, L, bm, bn, seed=D, flag_values=(0, SKIP_TOP, SKIP_BOTTOM))
    scale = 1 / math.sqrt(D)
    out, lse = tile_attention(q, k, v, tiles, scale=scale, return_lse=True, tma=tma)
    ref_out, ref_lse = tile_attention_reference(q, k, v, tiles, scale=scale)
    check(out, lse, ref_out, ref_lse, 1e-4 if dtype == torch.float32 else 2e-2)
    assert bool((out[torch.isinf(ref_lse)] == 0).all())  # query rows with no key: output 0


@pytest.mark.parametrize("spec", [
    WindowSpec.band((10, 9), 17, text_tokens=9, text_position="suffix"),
    WindowSpec.neighborhood((9, 11), (2, 3), text_tokens=6, text_position="prefix"),
    WindowSpec.band((12, 12), 20),
])
@pytest.mark.parametrize("D, tma", [(64, False), (72, False), (72, True)])
def test_window_flags_and_continuation(spec, D, tma):
    """INSIDE / OUTSIDE entries, and a second pass continuing the first: the union is full attention."""
    from ditaccel.kernels.window import window_tiles

    q, k, v = qkv(1, 2, spec.seq_len, D, seed=D)
    scale = 0.2
    inside, outside = (window_tiles(spec, part, 32, 16) for part in ("inside", "outside"))
    out_w, lse_w = tile_attention(q, k, v, inside, scale=scale, window=spec, return_lse=True, tma=tma)
    ref_w, ref_lw = tile_attention_reference(q, k, v, inside, scale=scale, window=spec)
    check(out_w, lse_w, ref_w, ref_lw, 1e-4)
    out_o, lse_o = tile_attention(q, k, v, outside, scale=scale, window=spec, return_lse=True, tma=tma)
    ref_o, ref_lo = tile_attention_reference(q, k, v, outside, scale=scale, window=spec)
    check(out_o, lse_o, ref_o, ref_lo, 1e-4)
    full, lse = tile_attention(q, k, v, outside, scale=scale, window=spec, init=(out_w, lse_w), return_lse=True,
                               tma=tma)
    s = q @ k.transpose(-1, -2) * scale
    torch.testing.assert_close(full, torch.softmax(s, -1) @ v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-4, rtol=1e-4)


def test_key_padding_and_flags_together():
    B, H, L, D = 2, 1, 90, 64
    q, k, v = qkv(B, H, L, D, seed=3)
    kpm = torch.rand(B, L, generator=torch.Generator().manual_seed(4)) > 0.3
    kpm[1, :32] = False
    tiles = random_tiles(B * H, L, 32, 32, seed=5, flag_values=(0, SKIP_TOP))
    out, lse = tile_attention(q, k, v, tiles, scale=0.125, key_padding_mask=kpm, return_lse=True)
    ref_out, ref_lse = tile_attention_reference(q, k, v, tiles, scale=0.125, key_padding_mask=kpm)
    check(out, lse, ref_out, ref_lse, 1e-4)


def test_compact_columns():
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, False, False]])
    idx, cnt = compact_columns(mask)
    assert cnt.tolist() == [3, 0, 1]
    assert idx[0, :3].tolist() == [0, 2, 3] and idx[2, :1].tolist() == [1]


def test_tile_list_checks_name_the_field():
    q = torch.zeros(1, 1, 32, 16)
    good = TileList(torch.zeros(1, 2, 1, dtype=torch.int32), torch.ones(1, 2, dtype=torch.int32), None, 16, 16)
    with pytest.raises(ValueError, match="block_m"):
        tile_attention(q, q, q, TileList(good.indices, good.counts, None, 48, 16), scale=1.0)
    with pytest.raises(ValueError, match="indices"):
        tile_attention(q, q, q, TileList(good.indices[:, :1], good.counts, None, 16, 16), scale=1.0)
    with pytest.raises(ValueError, match="counts"):
        tile_attention(q, q, q, TileList(good.indices, good.counts.long(), None, 16, 16), scale=1.0)
    with pytest.raises(ValueError, match="flags"):
        tile_attention(q, q, q, TileList(good.indices, good.counts, good.indices, 16, 16), scale=1.0)
    with pytest.raises(ValueError, match="init"):
        tile_attention(q, q, q, good, scale=1.0, init=(q[..., :8], torch.zeros(1, 1, 32)))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("tma", [False, True])
def test_cuda_window_and_sparse_lists(D, tma):
    """Compiled kernel (not the interpreter) on the GPU, pointer and tensor-descriptor loads."""
    from ditaccel.kernels.window import window_tiles

    spec = WindowSpec.band((24, 20), 60, text_tokens=37, text_position="suffix")
    q, k, v = (t.cuda().to(torch.bfloat16) for t in qkv(2, 3, spec.seq_len, D, seed=D))
    scale = 1 / math.sqrt(D)
    for bs in (64, 128):
        tiles = window_tiles(spec, "inside", bs, bs, "cuda")
        out, lse = tile_attention(q, k, v, tiles, scale=scale, window=spec, return_lse=True, tma=tma)
        ref_out, ref_lse = tile_attention_reference(q, k, v, tiles, scale=scale, window=spec)
        check(out, lse, ref_out, ref_lse, 2e-2)
        rnd = random_tiles(6, spec.seq_len, bs, bs, seed=bs, flag_values=(0, SKIP_TOP, SKIP_BOTTOM))
        rnd = TileList(*(t.cuda() if t is not None else None for t in (rnd.indices, rnd.counts, rnd.flags)), bs, bs)
        out, lse = tile_attention(q, k, v, rnd, scale=scale, return_lse=True, tma=tma)
        ref_out, ref_lse = tile_attention_reference(q, k, v, rnd, scale=scale)
        check(out, lse, ref_out, ref_lse, 2e-2)
