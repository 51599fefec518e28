import functools

import pytest
import torch
import torch.nn.functional as F

try:
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

from ditaccel.kernels.block_sparse import (
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_flops,
    indices_to_mask,
    mask_to_indices,
    pack_block_mask,
    unpack_block_mask,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")


# TRITON_INTERPRET is set per test, not at import: block_sparse reads it at kernel launch, and its
# kernel runs under the interpreter even when triton.language was imported first (conftest's
# diffusers import does that). Setting it process-wide before triton.language is imported would
# instead make triton's own @jit helpers interpreted, which breaks the compiled CUDA tests below.
@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    if request.node.name.startswith("test_cuda"):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels on the GPU
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if HAS_TRITON and ("triton" in request.node.name or "auto" in request.node.name):
        reason = _interpreter_problem()
        if reason:
            pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def _interpreter_problem():
    """Older Triton interpreters (3.6) with numpy >= 2.5 cannot take a loaded scalar as a loop
    bound (``int()`` of a 1-element array; fixed in later Triton). Returns the skip reason."""
    q = torch.zeros(1, 1, 16, 16)
    idx, cnt = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    try:
        block_sparse_attention(q, q, q, idx, cnt, block_size=16, backend="triton")
    except Exception as e:  # noqa: BLE001
        if "0-dimensional" in str(e):
            return f"this Triton's interpreter cannot run the kernel ({triton.__version__}): {e}"
    return None


def cdiv(a, b):
    return -(-a // b)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def qkv(B, H, L, D, dtype=torch.float32, seed=0, device="cpu", layout="bhld"):
    g = gen(seed)
    if layout == "blhd":  # (B, L, H, D) storage viewed as (B, H, L, D): non-contiguous
        return [torch.randn(B, L, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def random_selection(B, H, L, bs, seed, extra=2, device="cpu"):
    """Random per-(b, h, query block) key-block lists: random counts in [1, NK], random order,
    junk (-1 / repeats) after the valid entries, K = NK + extra columns."""
    g = gen(seed)
    nb = cdiv(L, bs)
    counts = torch.randint(1, nb + 1, (B, H, nb), generator=g)
    perm = torch.rand(B, H, nb, nb, generator=g).argsort(-1)
    junk = torch.randint(-1, nb, (B, H, nb, nb + extra), generator=g)
    idx = junk.clone()
    idx[..., :nb] = perm
    valid = torch.arange(nb + extra) < counts[..., None]
    idx = torch.where(valid, idx, junk)
    return idx.to(device=device, dtype=torch.int32), counts.to(device=device, dtype=torch.int32)


def random_kpm(B, L, seed, p=0.8, device="cpu"):
    return (torch.rand(B, L, generator=gen(seed)) < p).to(device)


def check_close(out, lse, ref_out, ref_lse, atol, lse_atol=1e-4):
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=atol)
    assert lse.dtype == torch.float32
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and bool((lse[~fin] == float("-inf")).all())
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), atol=lse_atol, rtol=lse_atol)


# ----------------------------------------------------------------------------- index helpers


@pytest.mark.parametrize("shape, p", [((2, 3, 5, 5), 0.5), ((1, 2, 7, 9), 0.2), ((1, 1, 4, 4), 1.0)])
def test_mask_indices_round_trip(shape, p):
    m = torch.rand(*shape, generator=gen(1)) < p
    m[0, 0, 0] = False  # an empty row: count 0
    idx, cnt = mask_to_indices(m)
    assert idx.dtype == cnt.dtype == torch.int32
    assert idx.shape == shape and cnt.shape == shape[:3]
    assert torch.equal(cnt, m.sum(-1).int())
    valid = torch.arange(shape[-1]) < cnt[..., None]
    assert bool((idx[~valid] == -1).all())
    for row, c, mrow in zip(idx.reshape(-1, shape[-1]), cnt.reshape(-1), m.reshape(-1, shape[-1])):
        assert row[:c].tolist() == torch.nonzero(mrow).flatten().tolist()  # ascending
    assert torch.equal(indices_to_mask(idx, cnt, shape[-1]), m)


def test_indices_to_mask_ignores_entries_after_count():
    idx, cnt = random_selection(2, 2, 100, 16, seed=3)
    nb = cdiv(100, 16)
    m = indices_to_mask(idx, cnt, nb)
    assert torch.equal(m.sum(-1).int(), cnt)
    for b, h, p in [(0, 0, 0), (1, 1, 6), (0, 1, 3)]:
        assert sorted(torch.nonzero(m[b, h, p]).flatten().tolist()) == sorted(idx[b, h, p, : cnt[b, h, p]].tolist())
    bad = idx.clone()
    bad[0, 0, 0, 0] = nb
    with pytest.raises(ValueError, match="kv_indices"):
        indices_to_mask(bad, cnt, nb)


# ----------------------------------------------------------------------------- reference


def brute_force(q, k, v, idx, cnt, bs, scale, kpm=None):
    """Per query row: softmax over the explicitly listed allowed keys, float64."""
    B, H, L, D = q.shape
    out = torch.zeros(B, H, L, D, dtype=torch.float64)
    lse = torch.full((B, H, L), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                blocks = set(idx[b, h, i // bs, : cnt[b, h, i // bs]].tolist())
                keys = [j for j in range(L) if j // bs in blocks and (kpm is None or bool(kpm[b, j]))]
                if not keys:
                    continue
                s = (k[b, h, keys].double() @ q[b, h, i].double()) * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h, keys].double()
    return out, lse


@pytest.mark.parametrize("use_kpm", [False, True])
def test_reference_matches_brute_force(use_kpm):
    B, H, L, D, bs = 2, 2, 37, 8, 16
    q, k, v = qkv(B, H, L, D, torch.float64, seed=4)
    idx, cnt = random_selection(B, H, L, bs, seed=5)
    kpm = None
    if use_kpm:
        kpm = random_kpm(B, L, seed=6)
        kpm[0, :16] = False  # key block 0 fully padded for batch 0 ...
        idx[0, 0, 1, 0], cnt[0, 0, 1] = 0, 1  # ... and the only block of (b=0, h=0, p=1): empty rows
    out, lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, scale=0.3, key_padding_mask=kpm)
    bo, bl = brute_force(q, k, v, idx, cnt, bs, 0.3, kpm)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, bo, atol=1e-10, rtol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(bl))
    fin = torch.isfinite(bl)
    torch.testing.assert_close(lse[fin], bl[fin], atol=1e-10, rtol=1e-10)
    if use_kpm:
        assert bool((out[0, 0, 16:32] == 0).all()) and bool((lse[0, 0, 16:32] == float("-inf")).all())


def test_reference_backend_float32_lse():
    q, k, v = qkv(1, 2, 50, 16, seed=7)
    idx, cnt = random_selection(1, 2, 50, 16, seed=8)
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=16, return_lse=True, backend="reference")
    ro, rl = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=16)
    assert torch.equal(out, ro) and torch.equal(lse, rl) and lse.dtype == torch.float32
    q64, k64, v64 = (x.double() for x in (q, k, v))
    out64, lse64 = block_sparse_attention(q64, k64, v64, idx, cnt, block_size=16, return_lse=True, backend="reference")
    assert out64.dtype == torch.float64 and lse64.dtype == torch.float32


# ----------------------------------------------------------------------------- gather (no kernel)

GATHER_CASES = [
    # L, block_size, D, dtype, key padding, B, H, kept, chunk_elems (small: several chunks)
    (37, 16, 8, torch.float64, True, 2, 2, 0.5, 1 << 24),
    (100, 16, 64, torch.float32, True, 1, 4, 0.3, 1 << 14),
    (130, 32, 72, torch.float32, False, 2, 2, 0.6, 1 << 15),
    (192, 64, 128, torch.bfloat16, True, 2, 1, 0.4, 1 << 24),
    (150, 64, 72, torch.float16, False, 1, 2, 1.0, 1 << 16),
]


@pytest.mark.parametrize("L, bs, D, dtype, use_kpm, B, H, kept, chunk", GATHER_CASES)
def test_gather_backend_matches_reference(L, bs, D, dtype, use_kpm, B, H, kept, chunk):
    from ditaccel.kernels.block_sparse import _gather

    q, k, v = qkv(B, H, L, D, dtype, seed=L + D)
    nb = -(-L // bs)
    g = torch.Generator().manual_seed(L)
    mask = torch.rand(B, H, nb, nb, generator=g) < kept
    mask[..., torch.arange(nb), torch.arange(nb)] = True  # every query block keeps one (ragged lists)
    kpm = None
    if use_kpm:
        kpm = random_kpm(B, L, seed=L)
        kpm[0, :bs] = False  # key block 0 padded out for batch 0 ...
        mask[0, :, 0] = False
        mask[0, :, 0, 0] = True  # ... and the only block of query block 0 there: rows with no key
    idx, cnt = mask_to_indices(mask)
    idx = torch.cat([idx, torch.full_like(idx[..., :2], 7)], -1)  # entries past the counts are ignored
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm)
    out, lse = _gather(q, k, v, idx, cnt, bs, D ** -0.5, kpm, chunk_elems=chunk)
    lse = lse.float()
    assert out.dtype == dtype and out.shape == q.shape
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    check_close(out, lse, ref_out, ref_lse, atol=tol)
    if use_kpm:
        assert bool((out[0, :, :bs] == 0).all()) and bool((lse[0, :, :bs] == float("-inf")).all())
    via_api = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, backend="gather",
                                     return_lse=True)
    check_close(*via_api, ref_out, ref_lse, atol=tol)


# ----------------------------------------------------------------------------- triton (interpreted on CPU)

TRITON_CASES = [
    # L, block_size, D, dtype, key padding, B, H
    (64, 16, 64, torch.float32, False, 2, 2),
    (100, 16, 64, torch.float32, True, 1, 4),
    (100, 32, 128, torch.float32, False, 2, 2),
    (192, 64, 128, torch.float32, True, 2, 2),
    (130, 32, 64, torch.float32, True, 2, 1),
    (192, 32, 64, torch.bfloat16, False, 1, 2),
    (100, 64, 128, torch.bfloat16, True, 2, 2),
    (130, 16, 128, torch.bfloat16, True, 1, 2),
    (100, 32, 72, torch.float32, True, 2, 1),  # head dim 72 = 64 + 16
    (150, 64, 72, torch.bfloat16, False, 1, 2),
    (192, 128, 64, torch.float16, True, 1, 2),
]


@needs_triton
@pytest.mark.parametrize("L, bs, D, dtype, use_kpm, B, H", TRITON_CASES)
def test_triton_matches_reference(L, bs, D, dtype, use_kpm, B, H):
    seed = L * 7 + bs + D
    q, k, v = qkv(B, H, L, D, dtype, seed=seed)
    idx, cnt = random_selection(B, H, L, bs, seed=seed + 1)
    kpm = random_kpm(B, L, seed=seed + 2) if use_kpm else None
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm)
    # query_blocks=2: two query blocks per program over the union of their selections
    for query_blocks in (1, 2) if bs <= 64 else (1,):
        out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, return_lse=True,
                                          backend="triton", query_blocks=query_blocks)
        check_close(out, lse, ref_out, ref_lse, atol=1e-4 if dtype == torch.float32 else 2e-2)
        plain = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, backend="triton",
                                       query_blocks=query_blocks)
        assert torch.equal(plain, out)  # return_lse does not change the output


@needs_triton
@pytest.mark.parametrize("L, bs, use_kpm", [(100, 32, False), (128, 64, True)])
def test_triton_all_blocks_is_dense_sdpa(L, bs, use_kpm):
    B, H, D = 2, 2, 64
    q, k, v = qkv(B, H, L, D, seed=L + bs)
    nb = cdiv(L, bs)
    idx, cnt = mask_to_indices(torch.ones(B, H, nb, nb, dtype=torch.bool))
    kpm = random_kpm(B, L, seed=11) if use_kpm else None
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, return_lse=True,
                                      backend="triton")
    attn_mask = None if kpm is None else kpm[:, None, None, :]
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)
    s = (q @ k.transpose(-1, -2)) / D**0.5
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_fully_padded_rows_give_zero_and_neg_inf():
    B, H, L, D, bs = 1, 2, 64, 64, 16
    q, k, v = qkv(B, H, L, D, seed=12)
    idx, cnt = random_selection(B, H, L, bs, seed=13)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[0, :16] = False
    idx[0, 1, 2, 0], cnt[0, 1, 2] = 0, 1  # (h=1, query block 2) sees only the padded key block 0
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, return_lse=True,
                                      backend="triton")
    assert bool((out[0, 1, 32:48] == 0).all()) and bool((lse[0, 1, 32:48] == float("-inf")).all())
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm)
    check_close(out, lse, ref_out, ref_lse, atol=1e-4)


@needs_triton
def test_triton_non_contiguous_layout_and_scale():
    B, H, L, D, bs = 1, 3, 80, 64, 16
    q, k, v = qkv(B, H, L, D, seed=14, layout="blhd")
    assert not q.is_contiguous()
    idx, cnt = random_selection(B, H, L, bs, seed=15)
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, scale=0.05, return_lse=True,
                                      backend="triton")
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, scale=0.05)
    check_close(out, lse, ref_out, ref_lse, atol=1e-4)


@needs_triton
def test_auto_backend(monkeypatch):
    B, H, L, D, bs = 1, 2, 48, 64, 16
    q, k, v = qkv(B, H, L, D, seed=16)
    idx, cnt = random_selection(B, H, L, bs, seed=17)
    tri = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, backend="triton")
    assert torch.equal(block_sparse_attention(q, k, v, idx, cnt, block_size=bs), tri)  # interpreting: triton
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gathered = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, backend="gather")
    assert torch.equal(block_sparse_attention(q, k, v, idx, cnt, block_size=bs), gathered)  # CPU, no interpreter
    with pytest.raises(ValueError, match="triton"):
        block_sparse_attention(q, k, v, idx, cnt, block_size=bs, backend="triton")


@needs_triton
def test_triton_backend_limits():
    q, k, v = qkv(1, 1, 32, 16, torch.float64, seed=18)
    idx, cnt = random_selection(1, 1, 32, 16, seed=19)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, k, v, idx, cnt, block_size=16, backend="triton")
    q, k, v = qkv(1, 1, 300, 16, seed=18)
    idx, cnt = random_selection(1, 1, 300, 256, seed=19)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, idx, cnt, block_size=256, backend="triton")
    out = block_sparse_attention(q, k, v, idx, cnt, block_size=256, backend="reference")  # any power of two
    assert out.shape == q.shape


# ----------------------------------------------------------------------------- flex


@pytest.mark.parametrize("L, bs, use_kpm", [(100, 16, True), (64, 32, False), (130, 64, True)])
def test_flex_matches_reference(L, bs, use_kpm):
    B, H, D = 2, 2, 64
    q, k, v = qkv(B, H, L, D, seed=L + bs + 20)
    idx, cnt = random_selection(B, H, L, bs, seed=21)
    kpm = random_kpm(B, L, seed=22) if use_kpm else None
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, return_lse=True,
                                      backend="flex")
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm)
    check_close(out, lse, ref_out, ref_lse, atol=1e-4)


# ----------------------------------------------------------------------------- dense query blocks

DENSE_CASES = [
    # L, block_size, D, dense query-block range, key padding: text first / last / in the middle, ragged ends
    (100, 16, 64, (0, 2), False),
    (229, 16, 72, (11, 15), True),
    (130, 32, 128, (3, 5), True),
    (96, 16, 64, (2, 4), False),
    (100, 16, 64, (0, 0), True),  # empty: an ordinary call
]


def _dense_case(L, bs, D, dense, use_kpm, dtype=torch.float32):
    """A random selection whose dense rows hold junk, and the same selection written out in full."""
    B, H = 2, 2
    q, k, v = qkv(B, H, L, D, dtype, seed=L + D)
    idx, cnt = random_selection(B, H, L, bs, seed=L + bs)
    cnt = cnt.clamp(max=3)
    cnt[:, :, dense[0]:dense[1]] = 0
    blocks = indices_to_mask(idx, cnt, cdiv(L, bs))
    idx, cnt = mask_to_indices(blocks)  # ascending, as the full lists below
    idx = idx[..., :3].contiguous()  # narrow lists: the dense rows do not fit
    idx[:, :, dense[0]:dense[1]] = -5  # junk in the dense rows: counts 0, any indices
    blocks[:, :, dense[0]:dense[1]] = True
    full_idx, full_cnt = mask_to_indices(blocks)
    kpm = random_kpm(B, L, seed=L) if use_kpm else None
    return (q, k, v), (idx, cnt), (full_idx, full_cnt), kpm


@pytest.mark.parametrize("backend", ["reference", "gather", "flex", "triton"])
@pytest.mark.parametrize("L, bs, D, dense, use_kpm", DENSE_CASES)
def test_dense_query_blocks_match_full_lists(backend, L, bs, D, dense, use_kpm):
    """dense_query_blocks = those rows listing every key block: same output and LSE as the
    reference on the written-out lists, whatever the dense rows of kv_indices / kv_counts hold."""
    if backend == "triton" and (not HAS_TRITON or _interpreter_problem()):
        pytest.skip("needs a Triton interpreter that runs the kernel")
    (q, k, v), (idx, cnt), (full_idx, full_cnt), kpm = _dense_case(L, bs, D, dense, use_kpm)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, full_idx, full_cnt, block_size=bs,
                                                        key_padding_mask=kpm)
    for query_blocks in (1, 2) if backend == "triton" else (None,):
        out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, return_lse=True,
                                          backend=backend, dense_query_blocks=dense, query_blocks=query_blocks)
        check_close(out, lse, ref_out, ref_lse, atol=1e-4)
        plain = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, backend=backend,
                                       dense_query_blocks=dense, query_blocks=query_blocks)
        assert torch.equal(plain, out)


@needs_triton
def test_triton_dense_query_blocks_bitwise_the_full_lists():
    """The Triton backend computes every row as the call with full lists would: bitwise (bf16)."""
    if _interpreter_problem():
        pytest.skip(_interpreter_problem())
    (q, k, v), (idx, cnt), (full_idx, full_cnt), kpm = _dense_case(229, 16, 72, (11, 15), True, torch.bfloat16)
    ref = block_sparse_attention(q, k, v, full_idx, full_cnt, block_size=16, key_padding_mask=kpm, backend="triton")
    out = block_sparse_attention(q, k, v, idx, cnt, block_size=16, key_padding_mask=kpm, backend="triton",
                                 dense_query_blocks=(11, 15))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bad", [(2, 1), (-1, 2), (0, 4), (0, 1.0), (True, 2), [0], "0,1"])
def test_dense_query_blocks_validation(bad):
    a = _valid_args()  # L = 40, block 16: 3 query blocks
    with pytest.raises(ValueError, match="dense_query_blocks"):
        block_sparse_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("kv_indices"), a.pop("kv_counts"),
                               dense_query_blocks=bad, **a)
    a = _mutate("kv_counts zero")  # the zero count is in query block 1: not read when that row is dense
    out = block_sparse_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("kv_indices"), a.pop("kv_counts"),
                                 dense_query_blocks=(1, 2), **a)
    assert out.shape == (1, 2, 40, 16)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 64, 100])
def test_pack_block_mask_round_trip(n):
    g = gen(n)
    mask = torch.rand(2, 3, 5, n, generator=g) < 0.3
    bits = pack_block_mask(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (2, 3, 5, cdiv(n, 8))
    assert torch.equal(unpack_block_mask(bits, n), mask)
    col = int(torch.randint(n, (1,), generator=g))  # column c is bit c % 8 of byte c // 8
    one = torch.zeros(n, dtype=torch.bool)
    one[col] = True
    assert pack_block_mask(one)[col // 8] == 1 << (col % 8) and int(pack_block_mask(one).sum()) == 1 << (col % 8)
    with pytest.raises(ValueError, match="n must"):
        unpack_block_mask(bits, n + 8)
    with pytest.raises(ValueError, match="mask"):
        pack_block_mask(mask.int())


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("L, bs", [(100, 32), (128, 64), (37, 16)])
def test_flops_brute_force(L, bs):
    B, H, D = 2, 3, 64
    idx, cnt = random_selection(B, H, L, bs, seed=L + bs)
    nb = cdiv(L, bs)
    idx[0, 0, nb - 1, 0] = nb - 1  # make sure the ragged last key block is kept somewhere
    blocks = indices_to_mask(idx, cnt, nb)
    cnt = blocks.sum(-1).int()
    idx, _ = mask_to_indices(blocks)
    tok = torch.arange(L) // bs
    pairs = int(blocks[:, :, tok][:, :, :, tok].sum())
    assert block_sparse_flops(cnt, bs, L, D, kv_indices=idx) == 4.0 * D * pairs
    rows = [min(bs, L - p * bs) for p in range(nb)]
    expect = 4.0 * D * sum(rows[p] * int(cnt[b, h, p]) * bs for b in range(B) for h in range(H) for p in range(nb))
    assert block_sparse_flops(cnt, bs, L, D) == expect
    full = torch.full((1, 1, nb), nb, dtype=torch.int32)
    full_idx, _ = mask_to_indices(torch.ones(1, 1, nb, nb, dtype=torch.bool))
    assert block_sparse_flops(full, bs, L, D, kv_indices=full_idx) == 4.0 * D * L * L


# ----------------------------------------------------------------------------- validation


def _valid_args(L=40, bs=16, B=1, H=2, D=16):
    q, k, v = qkv(B, H, L, D, seed=30)
    idx, cnt = random_selection(B, H, L, bs, seed=31)
    return dict(q=q, k=k, v=v, kv_indices=idx, kv_counts=cnt, block_size=bs, backend="reference")


def _mutate(name):
    a = _valid_args()
    if name == "q":
        a["q"] = a["q"][0]
    elif name == "k":
        a["k"] = a["k"][..., :8]
    elif name == "v":
        a["v"] = a["v"].double()
    elif name == "kv_indices":
        a["kv_indices"] = a["kv_indices"].long()
    elif name == "kv_indices shape":
        a["kv_indices"] = a["kv_indices"][:, :, :2]
    elif name == "kv_indices range":
        a["kv_indices"][0, 0, 0, 0] = 3
    elif name == "kv_indices negative":
        a["kv_indices"][0, 1, 1, 0] = -1
    elif name == "kv_indices distinct":
        a["kv_counts"][0, 0, 0] = 2
        a["kv_indices"][0, 0, 0, :2] = 1
    elif name == "kv_counts":
        a["kv_counts"] = a["kv_counts"][..., :2]
    elif name == "kv_counts zero":
        a["kv_counts"][0, 0, 1] = 0
    elif name == "kv_counts big":
        a["kv_counts"][0, 1, 0] = 4
    elif name == "block_size":
        a["block_size"] = 24
    elif name == "block_size small":
        a["block_size"] = 8
    elif name == "key_padding_mask":
        a["key_padding_mask"] = torch.ones(1, 39, dtype=torch.bool)
    elif name == "key_padding_mask dtype":
        a["key_padding_mask"] = torch.ones(1, 40)
    elif name == "scale":
        a["scale"] = -1.0
    elif name == "backend":
        a["backend"] = "cuda"
    return a


@pytest.mark.parametrize(
    "case",
    ["q", "k", "v", "kv_indices", "kv_indices shape", "kv_indices range", "kv_indices negative",
     "kv_indices distinct", "kv_counts", "kv_counts zero", "kv_counts big", "block_size", "block_size small",
     "key_padding_mask", "key_padding_mask dtype", "scale", "backend"],
)
def test_validation_names_argument(case):
    a = _mutate(case)
    with pytest.raises(ValueError, match=case.split()[0]):
        block_sparse_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("kv_indices"), a.pop("kv_counts"), **a)


def test_validation_can_be_skipped_and_helpers_validate():
    a = _mutate("kv_counts zero")  # data-dependent: only checked with validate=True
    out = block_sparse_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("kv_indices"), a.pop("kv_counts"),
                                 validate=False, **a)
    assert out.shape == (1, 2, 40, 16)
    with pytest.raises(ValueError, match="block_mask"):
        mask_to_indices(torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="kv_counts"):
        indices_to_mask(torch.zeros(1, 1, 2, 2, dtype=torch.int32), torch.ones(1, 1, 3, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="kv_counts"):
        block_sparse_flops(torch.ones(1, 1, 2, dtype=torch.int32), 16, 40, 64)
    with pytest.raises(ValueError, match="head_dim"):
        block_sparse_flops(torch.ones(1, 1, 3, dtype=torch.int32), 16, 40, 0)


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("use_kpm", [False, True])
def test_cuda_long_sequence_bf16(use_kpm):
    B, H, L, D, bs = 1, 4, 4096, 128, 64
    q, k, v = qkv(B, H, L, D, torch.bfloat16, seed=40, device="cuda")
    nb = L // bs
    g = gen(41)
    m = torch.rand(B, H, nb, nb, generator=g) < 0.2
    m[..., torch.arange(nb), torch.arange(nb)] = True
    idx, cnt = mask_to_indices(m.cuda())
    kpm = torch.ones(B, L, dtype=torch.bool, device="cuda")
    if use_kpm:
        kpm[:, -300:] = False  # padded text keys
    kpm = kpm if use_kpm else None
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, return_lse=True)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm)
    check_close(out, lse, ref_out, ref_lse, atol=2e-2, lse_atol=1e-3)
    fo, fl = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, return_lse=True,
                                    backend="flex")
    check_close(fo, fl, ref_out, ref_lse, atol=2e-2, lse_atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("bs, D, dtype", [(16, 64, torch.float16), (32, 72, torch.float32), (128, 128, torch.bfloat16)])
def test_cuda_ragged_block_sizes(bs, D, dtype):
    B, H, L = 2, 2, 1000
    q, k, v = qkv(B, H, L, D, dtype, seed=bs + D, device="cuda", layout="blhd")
    idx, cnt = random_selection(B, H, L, bs, seed=bs, device="cuda")
    kpm = random_kpm(B, L, seed=bs, device="cuda")
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, return_lse=True)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm)
    check_close(out, lse, ref_out, ref_lse, atol=1e-4 if dtype == torch.float32 else 2e-2, lse_atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("dense", [(0, 3), (62, 66)])  # text first (CogVideoX), text last (HunyuanVideo)
def test_cuda_dense_query_blocks_bf16(dense):
    """On the GPU (compiled kernel, TMA where available): dense_query_blocks gives, bitwise, the
    call with those rows' full lists."""
    L, D, bs = 66 * 64 - 40, 128, 64
    (q, k, v), (idx, cnt), (full_idx, full_cnt), kpm = _dense_case(L, bs, D, dense, True, torch.bfloat16)
    q, k, v, idx, cnt, full_idx, full_cnt, kpm = (t.cuda() for t in (q, k, v, idx, cnt, full_idx, full_cnt, kpm))
    ref = block_sparse_attention(q, k, v, full_idx, full_cnt, block_size=bs, key_padding_mask=kpm)
    out = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, dense_query_blocks=dense)
    assert torch.equal(out, ref)

