import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ditaccel.kernels import (
    WindowSpec,
    window_attention,
    window_attention_reference,
    window_dense_mask,
    window_mask_mod,
    window_pair_fraction,
    window_tile_fraction,
)


def brute_mask(spec: WindowSpec) -> torch.Tensor:
    n, t, L = spec.num_visual, spec.text_tokens, spec.seq_len
    gh, gw = spec.grid
    off = t if spec.text_position == "prefix" else 0
    m = torch.zeros(L, L, dtype=torch.bool)
    rows = gh // spec.frames  # rows of one frame
    for i, j in itertools.product(range(L), range(L)):
        a, b = i - off, j - off
        if not (0 <= a < n and 0 <= b < n):
            m[i, j] = True
        elif spec.kind == "band1d":
            m[i, j] = abs(a - b) <= spec.radius[0]
        elif spec.kind == "neighborhood3d":  # (frame, row in the frame, column) of each token
            (fa, ra, ca), (fb, rb, cb) = ((x // (rows * gw), x // gw % rows, x % gw) for x in (a, b))
            rt, rh, rw = spec.radius
            m[i, j] = abs(fa - fb) <= rt and abs(ra - rb) <= rh and abs(ca - cb) <= rw
        else:
            m[i, j] = abs(a // gw - b // gw) <= spec.radius[0] and abs(a % gw - b % gw) <= spec.radius[1]
    return m


def qkv(spec, B=2, H=3, D=64, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, spec.seq_len, D, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


SPECS = [
    WindowSpec.band((5, 7), 3),
    WindowSpec.band((5, 7), 0, text_tokens=3),
    WindowSpec.band((3, 11), 4, text_tokens=5, text_position="suffix"),
    WindowSpec.band((8, 8), 100, text_tokens=3),
    WindowSpec.neighborhood((5, 7), (1, 2)),
    WindowSpec.neighborhood((8, 8), 0, text_tokens=3),
    WindowSpec.neighborhood((3, 11), (1, 3), text_tokens=5, text_position="suffix"),
    WindowSpec.neighborhood((8, 8), (2, 1), text_tokens=5),
    WindowSpec.neighborhood3d((12, 4), 3, (1, 1, 1)),  # 3 frames of 4 x 4
    WindowSpec.neighborhood3d((15, 5), 5, (0, 1, 2), text_tokens=4),
    WindowSpec.neighborhood3d((8, 6), 4, (2, 0, 1), text_tokens=3, text_position="suffix"),
]


# ----------------------------------------------------------------------------- spec


def test_spec_basics():
    s = WindowSpec.paper_default((16, 16), text_tokens=7)
    assert s.kind == "band1d" and s.radius == (32, 32) and s.seq_len == 263
    assert WindowSpec.band([4, 4], 2) == WindowSpec("band1d", (4, 4), (2, 2))
    assert hash(WindowSpec.neighborhood((4, 4), 1)) == hash(WindowSpec.neighborhood((4, 4), (1, 1)))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kind="ring", grid=(4, 4), radius=1), "kind"),
        (dict(kind="band1d", grid=(0, 4), radius=1), "grid"),
        (dict(kind="band1d", grid=(4, 4), radius=-1), "radius"),
        (dict(kind="neighborhood2d", grid=(4, 4), radius=(1, -2)), "radius"),
        (dict(kind="band1d", grid=(4, 4), radius=(1, 2)), "radius"),
        (dict(kind="band1d", grid=(4, 4), radius=1, text_tokens=-1), "text_tokens"),
        (dict(kind="band1d", grid=(4, 4), radius=1, text_position="middle"), "text_position"),
        (dict(kind="neighborhood3d", grid=(6, 4), radius=(1, 1), frames=3), "radius"),
        (dict(kind="neighborhood3d", grid=(6, 4), radius=(1, -1, 1), frames=3), "radius"),
        (dict(kind="neighborhood3d", grid=(6, 4), radius=1, frames=4), "frames"),
        (dict(kind="neighborhood3d", grid=(6, 4), radius=1, frames=0), "frames"),
        (dict(kind="neighborhood2d", grid=(6, 4), radius=1, frames=2), "frames"),
    ],
)
def test_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WindowSpec(**kwargs)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dense_mask_matches_brute_force(spec):
    assert torch.equal(window_dense_mask(spec), brute_mask(spec))


def test_mask_mod_under_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    spec = WindowSpec.neighborhood((8, 8), (1, 2), text_tokens=3)
    L = spec.seq_len
    bm = create_block_mask(window_mask_mod(spec), None, None, L, L, device="cpu", BLOCK_SIZE=16)
    assert torch.equal(bm.to_dense()[0, 0].bool(), _tile_any(brute_mask(spec), 16, 16))


# ----------------------------------------------------------------------------- attention


CASES = [
    (WindowSpec.band((5, 7), 3, text_tokens=3), 64),
    (WindowSpec.band((8, 8), 0), 72),
    (WindowSpec.band((3, 11), 9, text_tokens=5, text_position="suffix"), 128),
    (WindowSpec.band((8, 8), 20, text_tokens=5), 72),
    (WindowSpec.neighborhood((5, 7), (1, 2), text_tokens=5), 72),
    (WindowSpec.neighborhood((8, 8), 0, text_tokens=3, text_position="suffix"), 64),
    (WindowSpec.neighborhood((3, 11), (1, 3)), 128),
    (WindowSpec.neighborhood((8, 8), (2, 1), text_tokens=3), 72),
    (WindowSpec.neighborhood3d((12, 4), 3, (1, 1, 1), text_tokens=5), 64),
    (WindowSpec.neighborhood3d((16, 5), 4, (1, 0, 2), text_tokens=3, text_position="suffix"), 72),
    (WindowSpec.neighborhood3d((10, 6), 5, (0, 2, 1)), 64),
]


@pytest.mark.parametrize("backend, chunk_size", [("chunked", None), ("chunked", 1), ("chunked", 13), ("sdpa_mask", None)])
@pytest.mark.parametrize("spec, D", CASES, ids=str)
def test_fast_paths_match_reference_fp32(spec, D, backend, chunk_size):
    q, k, v = qkv(spec, D=D, seed=D + spec.seq_len)
    ref = window_attention_reference(q, k, v, spec)
    out = window_attention(q, k, v, spec, backend=backend, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec, D", CASES[::2], ids=str)
def test_chunked_matches_reference_bf16(spec, D):
    q, k, v = qkv(spec, D=D, dtype=torch.bfloat16, seed=1)
    ref = window_attention_reference(q, k, v, spec)
    out = window_attention(q, k, v, spec, backend="chunked")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_reference_scale_lse_and_float64():
    spec = WindowSpec.band((4, 6), 2, text_tokens=3)
    q, k, v = qkv(spec, D=72, dtype=torch.float64, seed=3)
    out, lse = window_attention_reference(q, k, v, spec, scale=0.3, return_lse=True)
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~brute_mask(spec), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    assert out.dtype == torch.float64 and lse.shape == q.shape[:3]
    torch.testing.assert_close(window_attention(q, k, v, spec, scale=0.3, backend="chunked"), out)


@pytest.mark.parametrize(
    "spec",
    [
        WindowSpec.band((5, 7), 35, text_tokens=3),
        WindowSpec.band((3, 11), 1000, text_tokens=5, text_position="suffix"),
        WindowSpec.neighborhood((5, 7), (5, 7), text_tokens=3),
        WindowSpec.neighborhood((8, 8), (100, 100)),
        WindowSpec.neighborhood3d((12, 4), 3, (2, 3, 3), text_tokens=2),
    ],
    ids=str,
)
def test_large_radius_is_full_attention(spec):
    q, k, v = qkv(spec, D=72, seed=5)
    full = F.scaled_dot_product_attention(q, k, v)
    assert bool(window_dense_mask(spec).all())
    assert window_tile_fraction(spec, 16, 16) == 1.0 and window_pair_fraction(spec) == 1.0
    for backend in ("chunked", "sdpa_mask", "reference"):
        torch.testing.assert_close(window_attention(q, k, v, spec, backend=backend), full, atol=1e-5, rtol=1e-5)


def _flex_cpu_works() -> bool:
    try:
        spec = WindowSpec.band((4, 4), 1)
        q, k, v = qkv(spec, B=1, H=1, D=16)
        window_attention(q, k, v, spec, backend="flex")
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _flex_cpu_works(), reason="flex_attention does not run on CPU in this torch build")
@pytest.mark.parametrize("spec, D", CASES[1::2], ids=str)
def test_flex_cpu_matches_reference(spec, D):
    q, k, v = qkv(spec, D=D, seed=7)
    ref = window_attention_reference(q, k, v, spec)
    out = window_attention(q, k, v, spec, backend="flex", block_size=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_zero_padded_head_dim(monkeypatch):
    """The fallback for head dims flex rejects: zero-pad D (72 -> 128), keep the scale, slice."""
    if not _flex_cpu_works():
        pytest.skip("flex_attention does not run on CPU in this torch build")
    from ditaccel.kernels import window

    monkeypatch.setattr(window, "_FLEX_PAD_HEAD_DIMS", {("cpu", 72)})
    spec = WindowSpec.neighborhood((5, 7), (1, 2), text_tokens=3)
    q, k, v = qkv(spec, D=72, seed=8)
    out = window_attention(q, k, v, spec, backend="flex", block_size=16)
    assert out.shape == q.shape
    torch.testing.assert_close(out, window_attention_reference(q, k, v, spec), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 72])
@pytest.mark.parametrize(
    "spec",
    [
        WindowSpec.band((31, 32), 124, text_tokens=32),
        WindowSpec.neighborhood((30, 32), (4, 4), text_tokens=64, text_position="suffix"),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flex_cuda_matches_reference(spec, D, dtype):
    q, k, v = qkv(spec, B=2, H=4, D=D, dtype=dtype, seed=D, device="cuda")
    ref = window_attention_reference(q, k, v, spec)
    out = window_attention(q, k, v, spec)  # auto -> flex on CUDA
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(window_attention(q, k, v, spec, backend="chunked").float(), ref.float(), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- accounting


def _tile_any(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    L = mask.shape[0]
    nq, nk = math.ceil(L / bq), math.ceil(L / bk)
    return torch.tensor(
        [[bool(mask[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].any()) for j in range(nk)] for i in range(nq)]
    )


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("bq, bk", [(8, 8), (16, 8), (5, 13)])
def test_tile_fraction_brute_force(spec, bq, bk):
    mask = brute_mask(spec)
    tiles = _tile_any(mask, bq, bk)
    assert window_tile_fraction(spec, bq, bk) == tiles.sum().item() / tiles.numel()
    assert window_pair_fraction(spec) == mask.sum().item() / mask.numel()


@pytest.mark.parametrize("grid, b", [((8, 8), 16), ((5, 7), 8), ((16, 16), 128), ((64, 64), 128)])
def test_tile_fraction_radius_zero_is_diagonal(grid, b):
    spec = WindowSpec.band(grid, 0)
    nb = math.ceil(spec.seq_len / b)
    assert window_tile_fraction(spec, b, b) == nb / nb**2
    assert window_pair_fraction(spec) == 1 / spec.seq_len


# ----------------------------------------------------------------------------- validation


def test_input_validation():
    spec = WindowSpec.band((4, 4), 2, text_tokens=2)
    q, k, v = qkv(spec, D=64)
    with pytest.raises(ValueError, match="L=17"):
        window_attention(*qkv(WindowSpec.band((1, 17), 1), D=64), spec)
    with pytest.raises(ValueError, match="q must be 4-D"):
        window_attention(q[0], k, v, spec)
    with pytest.raises(ValueError, match="v must be 4-D"):
        window_attention(q, k, v[0], spec)
    with pytest.raises(ValueError, match="k must have the same shape"):
        window_attention(q, k[:, :, :-1], v, spec)
    with pytest.raises(ValueError, match="v must have the same dtype"):
        window_attention(q, k, v.double(), spec)
    with pytest.raises(ValueError, match="backend"):
        window_attention(q, k, v, spec, backend="magic")
    with pytest.raises(ValueError, match="spec"):
        window_attention(q, k, v, "band1d")
    with pytest.raises(ValueError, match="spec.seq_len"):
        window_attention_reference(q, k, v, WindowSpec.band((4, 4), 2))


# --------------------------------------------------------------------------- text key padding
def _padding(spec, B, seed):
    """A (B, L) key-padding mask padding a different number of text tokens per row (row 0 none)."""
    g = torch.Generator().manual_seed(seed)
    t0 = 0 if spec.text_position == "prefix" else spec.num_visual
    m = torch.ones(B, spec.seq_len, dtype=torch.bool)
    for b in range(1, B):
        pad = int(torch.randint(1, spec.text_tokens + 1, (1,), generator=g))
        m[b, t0 + spec.text_tokens - pad:t0 + spec.text_tokens] = False  # right padding of the text
    return m


PADDED = [WindowSpec.band((4, 6), 3, 5, "prefix"), WindowSpec.band((6, 5), 4, 7, "suffix"),
          WindowSpec.neighborhood((5, 6), (1, 2), 6, "suffix"), WindowSpec.neighborhood((4, 4), (1, 1), 3, "prefix")]


@pytest.mark.parametrize("backend", ["auto", "chunked", "sdpa_mask", "reference"]
                         + (["flex"] if _flex_cpu_works() else []))
@pytest.mark.parametrize("spec", PADDED, ids=str)
def test_key_padding_matches_the_masked_definition(spec, backend):
    """Padded keys are never attended, by any query; everything else is the window (text rows and
    columns dense): softmax over window_dense_mask & key_padding_mask, from the brute-force mask."""
    q, k, v = qkv(spec, B=3, H=2, D=16, seed=5)
    kpm = _padding(spec, 3, seed=6)
    out = window_attention(q, k, v, spec, backend=backend, key_padding_mask=kpm)
    allowed = brute_mask(spec)[None, None] & kpm[:, None, None, :]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(16)
    expected = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[~kpm[:, None, :, None].expand_as(k)] = 50.0  # whatever sits in the padded keys
    v2[~kpm[:, None, :, None].expand_as(v)] = -50.0
    torch.testing.assert_close(window_attention(q, k2, v2, spec, backend=backend, key_padding_mask=kpm), out)
    assert torch.equal(window_attention(q, k, v, spec, backend=backend, key_padding_mask=torch.ones_like(kpm)),
                       window_attention(q, k, v, spec, backend=backend))


def test_key_padding_of_a_visual_key_is_refused():
    spec = WindowSpec.band((4, 4), 2, 4, "prefix")
    q, k, v = qkv(spec, B=1, H=1, D=8)
    kpm = torch.ones(1, spec.seq_len, dtype=torch.bool)
    kpm[0, 6] = False  # a visual token
    for backend in ("chunked", "reference"):
        with pytest.raises(ValueError, match="key_padding_mask: window attention accepts padding on text tokens"):
            window_attention(q, k, v, spec, backend=backend, key_padding_mask=kpm)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        window_attention(q, k, v, spec, key_padding_mask=kpm[:, 1:])


def test_3d_window_outside_the_tile_kernel():
    """The Triton tile kernel evaluates band / 2D windows only: asked for a 3D one it refuses, and
    the fused full + window entry point runs it as two passes."""
    from ditaccel.kernels.window_residual import full_and_window_attention

    spec = WindowSpec.neighborhood3d((12, 4), 3, (1, 1, 1), text_tokens=2)
    q, k, v = qkv(spec, B=1, H=2, D=16)
    with pytest.raises(ValueError, match="backend 'triton' runs"):
        window_attention(q, k, v, spec, backend="triton")
    full, win = full_and_window_attention(q, k, v, spec)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(win, window_attention_reference(q, k, v, spec), atol=1e-5, rtol=1e-5)


def test_3d_spec_round_trips_through_the_operator_encoding():
    from ditaccel.kernels import ops

    for spec in SPECS:
        assert ops.spec_from_ints(ops.spec_to_ints(spec)) == spec
