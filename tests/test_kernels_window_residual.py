import pytest
import torch
import torch.nn.functional as F

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

from ditaccel.kernels.window import WindowSpec, window_dense_mask
from ditaccel.kernels.window_residual import (
    full_and_window_attention,
    full_and_window_attention_reference,
    tile_classes,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")


# TRITON_INTERPRET is set per test (the kernel reads it at launch), never at import: see
# tests/test_kernels_block_sparse.py. CUDA tests clear it so the kernel is compiled.
@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    if request.node.name.startswith("test_cuda") or "no_interpret" in request.node.name:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def qkv(B, H, L, D, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def check(out, ref, atol):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=atol)


SPECS = {
    "band": WindowSpec.band((5, 7), 6),
    "band_prefix": WindowSpec.band((3, 11), 4, text_tokens=5),
    "band_suffix": WindowSpec.band((8, 8), 9, text_tokens=6, text_position="suffix"),
    "nbhd": WindowSpec.neighborhood((8, 8), (1, 2)),
    "nbhd_prefix": WindowSpec.neighborhood((5, 7), (2, 1), text_tokens=7),
    "nbhd_suffix": WindowSpec.neighborhood((3, 11), (1, 3), text_tokens=4, text_position="suffix"),
}


@needs_triton
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("D, dtype, bs", [(64, torch.float32, 16), (72, torch.bfloat16, 32), (128, torch.float32, 64)])
def test_triton_matches_reference(name, D, dtype, bs):
    spec = SPECS[name]
    q, k, v = qkv(1, 2, spec.seq_len, D, dtype, seed=D + bs)
    out_f, out_w = full_and_window_attention(q, k, v, spec, backend="triton", block_size=bs)
    ref_f, ref_w = full_and_window_attention_reference(q, k, v, spec)
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    check(out_f, ref_f, atol)
    check(out_w, ref_w, atol)


@needs_triton
def test_triton_fp16_scale_noncontiguous_default_block():
    spec = WindowSpec.neighborhood((5, 7), (1, 1), text_tokens=3)
    L, D = spec.seq_len, 72
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, L, 3, D, generator=g).half().transpose(1, 2) for _ in range(3))  # (B, H, L, D) views
    out_f, out_w = full_and_window_attention(q, k, v, spec, scale=0.3)
    ref_f, ref_w = full_and_window_attention_reference(q, k, v, spec, scale=0.3)
    check(out_f, ref_f, 2e-3)
    check(out_w, ref_w, 2e-3)


@needs_triton
@pytest.mark.parametrize("spec", [WindowSpec.band((5, 7), 35), WindowSpec.neighborhood((3, 11), (3, 11), text_tokens=4)])
def test_radius_covering_everything_gives_full(spec):
    q, k, v = qkv(1, 2, spec.seq_len, 64, seed=7)
    out_f, out_w = full_and_window_attention(q, k, v, spec, backend="triton", block_size=16)
    assert torch.equal(tile_classes(spec, 16), torch.full_like(tile_classes(spec, 16), 2))
    torch.testing.assert_close(out_w, out_f, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_f, F.scaled_dot_product_attention(q, k, v), atol=1e-4, rtol=1e-4)


@needs_triton
def test_full_output_is_sdpa_and_window_is_masked_sdpa():
    spec = WindowSpec.band((8, 8), 3, text_tokens=5)
    q, k, v = qkv(2, 1, spec.seq_len, 64, seed=3)
    out_f, out_w = full_and_window_attention(q, k, v, spec, backend="triton", block_size=32)
    torch.testing.assert_close(out_f, F.scaled_dot_product_attention(q, k, v), atol=1e-4, rtol=1e-4)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=window_dense_mask(spec))
    torch.testing.assert_close(out_w, masked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["band_prefix", "nbhd_suffix"])
@pytest.mark.parametrize("bs", [16, 64])
def test_tile_classes_match_dense_mask(name, bs):
    spec = SPECS[name]
    L = spec.seq_len
    nb = -(-L // bs)
    m = window_dense_mask(spec)
    cls = tile_classes(spec, bs)
    assert cls.shape == (nb, nb) and cls.dtype == torch.int8
    for p in range(nb):
        for j in range(nb):
            t = m[p * bs : (p + 1) * bs, j * bs : (j + 1) * bs]
            assert int(cls[p, j]) == (2 if bool(t.all()) else 1 if bool(t.any()) else 0)
    assert set(cls.unique().tolist()) <= {0, 1, 2}


def test_reference_and_auto_without_interpreter_no_interpret():
    spec = SPECS["nbhd_prefix"]
    q, k, v = qkv(1, 2, spec.seq_len, 16, seed=11)
    out_f, out_w = full_and_window_attention(q, k, v, spec)  # auto on CPU, no interpreter: reference
    ref_f, ref_w = full_and_window_attention_reference(q, k, v, spec)
    assert torch.equal(out_f, ref_f) and torch.equal(out_w, ref_w)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="backend 'triton'"):
            full_and_window_attention(q, k, v, spec, backend="triton")


def _call(case):
    spec = WindowSpec.band((4, 4), 2, text_tokens=2)
    q, k, v = qkv(1, 1, spec.seq_len, 16)
    a = {"q": q, "k": k, "v": v, "spec": spec}
    if case == "q":
        a["q"] = q[0]
    elif case == "k":
        a["k"] = k[..., :8]
    elif case == "v":
        a["v"] = v.double()
    elif case == "spec":
        a["spec"] = (4, 4)
    elif case == "spec.seq_len":
        a["spec"] = WindowSpec.band((4, 4), 2)
    elif case == "scale":
        a["scale"] = 0.0
    elif case == "backend":
        a["backend"] = "flex"
    elif case == "block_size":
        a["block_size"] = 48
    return full_and_window_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("spec"), **a)


@pytest.mark.parametrize("case", ["q", "k", "v", "spec", "spec.seq_len", "scale", "backend", "block_size"])
def test_validation_names_argument(case):
    with pytest.raises(ValueError, match=case.replace(".", r"\.")):
        _call(case)


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("spec", [
    WindowSpec.band((64, 64), 512),
    WindowSpec.neighborhood((60, 68), (8, 8), text_tokens=16),
])
@pytest.mark.parametrize("bs", [64, 128])
def test_cuda_long_sequence_bf16(spec, bs):
    L = spec.seq_len
    q, k, v = qkv(1, 2, L, 72, torch.bfloat16, seed=40, device="cuda")
    out_f, out_w = full_and_window_attention(q, k, v, spec, block_size=bs)
    ref_f, ref_w = full_and_window_attention_reference(q, k, v, spec)
    check(out_f, ref_f, 2e-2)
    check(out_w, ref_w, 2e-2)
