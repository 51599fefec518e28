"""The block-mass kernel variants of ``scripts/tune_block_mass.py`` (f16 and polynomial exps,
rows-first and tensor-core sums), which the package does not ship: each against brute force under
the Triton interpreter (compiled on CUDA), so that the tuning script still measures correct
kernels. The package's own kernel is tested in test_kernels_block_mass.py."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_block_mass import (  # noqa: E402
    _interpreter,  # noqa: F401 - the autouse TRITON_INTERPRET fixture
    assert_mass_close,
    bm,
    brute_mass,
    key_mask,
    needs_compiled_triton,
    needs_triton,
    qkv,
)

_spec = importlib.util.spec_from_file_location("tune_block_mass",
                                               Path(__file__).parents[1] / "scripts" / "tune_block_mass.py")
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)


def assert_mass_bound(W, ref, rel=1e-2):
    """The bound of the fp16-p kernel variants: every entry >= 1e-3 of its row's max within ``rel``
    (relative), every row sum within ``rel``; no inf / NaN anywhere."""
    W, ref = W.double().cpu(), ref.double().cpu()
    assert W.shape == ref.shape and torch.isfinite(W).all()
    big = ref >= 1e-3 * ref.amax(-1, keepdim=True)
    big &= ref > 0
    assert ((W - ref).abs() <= rel * ref)[big].all(), float(((W - ref).abs() / ref)[big].max())
    assert ((W - ref).abs() <= rel * ref.abs().amax(-1, keepdim=True) * 1e-3 + rel * ref)[~big].all()
    torch.testing.assert_close(W.sum(-1), ref.sum(-1), rtol=rel, atol=1e-12)


def assert_variant_close(W, ref, exp, reduction, dtype):
    """Exact variants to float32 rounding (brute force from the same rounded inputs), fp16-p ones
    to their bound."""
    if tune.p16(exp, reduction, dtype):
        assert_mass_bound(W, ref)
    else:
        assert_mass_close(W, ref, rtol=1e-5 if dtype == torch.float32 else 1e-4, atol_frac=1e-6)


@needs_triton
@pytest.mark.parametrize("reduction", [r for r in tune.REDUCTIONS if r != "keys"])
@pytest.mark.parametrize(
    "bs,block_m,block_n", [(16, 16, 16), (16, 64, 32), (32, 128, 32), (32, 32, 128), (64, 64, 128), (128, 128, 128)]
)
def test_variant_tilings(bs, block_m, block_n, reduction):
    """Several query/key blocks per program (tile reshapes, padded indicators) and one block per program."""
    q, k, _ = qkv(B=1, H=2, L=150, D=64, seed=5)
    mask = key_mask(1, 150)
    _, lse = bm.attention_with_lse_reference(q, k, k, key_padding_mask=mask)
    W = tune.block_mass_variant(q, k, lse, bs, 0.125, mask, block_m=block_m, block_n=block_n, exp="f32",
                                reduction=reduction)
    assert_mass_close(W, brute_mass(q, k, bs, mask=mask), rtol=1e-5, atol_frac=1e-6)


# (L, D, block, BLOCK_M, BLOCK_N, masked): ragged and even L, head dims 64 / 72 (split 64 + 16) / 128
VARIANT_SHAPES = [(150, 72, 32, 64, 128, True), (100, 128, 16, 32, 64, True), (128, 64, 64, 64, 64, False),
                  (130, 64, 32, 128, 32, True)]
VARIANTS = [(e, r) for e in tune.EXPS for r in tune.REDUCTIONS]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exp,reduction", VARIANTS)
def test_variants(exp, reduction, dtype):
    """Every exp x reduction variant against brute force: exact ones to float32 rounding, fp16-p
    ones to their bound; key padding, a dead batch entry and -inf LSE rows contribute nothing."""
    i = VARIANTS.index((exp, reduction)) + (dtype == torch.float32)
    L, D, bs, block_m, block_n, masked = VARIANT_SHAPES[i % len(VARIANT_SHAPES)]
    q, k, _ = qkv(B=2, H=2, L=L, D=D, dtype=dtype, seed=i)
    mask = key_mask(2, L, dead_batch=1) if masked else None
    _, lse = bm.attention_with_lse_reference(q, k, k, key_padding_mask=mask)
    lse[0, 1, 10:20] = float("-inf")
    W = tune.block_mass_variant(q, k, lse, bs, D**-0.5, mask, block_m, block_n, exp=exp, reduction=reduction)
    if masked:
        assert (W[1] == 0).all()
    assert_variant_close(W, brute_mass(q, k, bs, mask=mask, lse=lse), exp, reduction, dtype)


@needs_triton
@pytest.mark.parametrize("exp,reduction", [("f16", "keys"), ("f32", "dot")])
def test_fp16_p_peaked_and_stale_lse(exp, reduction):
    """fp16-p variants on peaked attention (W over many orders of magnitude) keep their bound, also
    with a stale LSE up to 4 nats low (p up to e**4); far lower (p up to e**12) they saturate, finite."""
    q, k, _ = qkv(B=1, H=2, L=192, D=64, dtype=torch.bfloat16, seed=9)
    q = q * 3  # scores spread over ~ +-25: sharply peaked rows
    _, lse = bm.attention_with_lse_reference(q, k, k)
    for drop in (0.0, 4.0):
        W = tune.block_mass_variant(q, k, lse - drop, 32, 0.125, None, 64, 64, exp=exp, reduction=reduction)
        assert_mass_bound(W, brute_mass(q, k, 32, lse=lse - drop))
    W = tune.block_mass_variant(q, k, lse - 12.0, 32, 0.125, None, 64, 64, exp=exp, reduction=reduction)
    assert torch.isfinite(W).all() and (W <= brute_mass(q, k, 32, lse=lse - 12.0) * 1.01).all()


@needs_triton
@pytest.mark.parametrize(
    "kw,match",
    [(dict(exp="f8"), "exp"), (dict(reduction="cols"), "reduction"), (dict(block_m=24, exp="f16"), "multiples"),
     (dict(block_n=512, reduction="dot"), "16 blocks")],
)
def test_rejects_bad_variant(kw, match):
    q, k, _ = qkv(L=32, D=16)
    with pytest.raises(ValueError, match=match):
        tune.block_mass_variant(q, k, torch.zeros(1, 2, 32), 16, 0.25, None, **kw)


@needs_compiled_triton
@pytest.mark.parametrize("D", [72, 128])
@pytest.mark.parametrize(
    "exp,reduction",
    [(e, "keys") for e in tune.EXPS] + [("f32", r) for r in tune.REDUCTIONS if r != "keys"] + [("f16", "dot")],
)
def test_cuda_variants(exp, reduction, D):
    """Each exp (the f16 and mixed ones through inline PTX) and each reduction compiled, ragged L,
    split head dim."""
    q, k, v = qkv(B=1, H=2, L=3000, D=D, dtype=torch.bfloat16, seed=24, device="cuda")
    _, lse = bm.attention_with_lse_reference(q, k, v)
    W = tune.block_mass_variant(q, k, lse, 64, D**-0.5, None, exp=exp, reduction=reduction)
    ref = bm.block_mass_reference(q, k, lse, block_size=64)
    if tune.p16(exp, reduction, torch.bfloat16):
        assert_mass_bound(W, ref)
    else:
        torch.testing.assert_close(W, ref, rtol=1e-3, atol=1e-5 * float(ref.max()))
