"""Block-sparse attention: each query block attends to a chosen list of key blocks.

The sequence of ``L`` tokens is cut into ``NQ = NK = ceil(L / block_size)`` blocks of
``block_size`` tokens (the last one ragged when ``block_size`` does not divide
``L``; tokens ``>= L`` do not exist and are never attended). For every
``(batch b, head h, query block p)`` the caller selects key blocks:

* ``kv_indices``: int32 ``(B, H, NQ, K)``; entries ``kv_indices[b, h, p, :kv_counts[b, h, p]]``
  are the selected key-block ids (distinct, each in ``[0, NK)``, any order); the
  entries after them are ignored (``-1``, repeats, anything).
* ``kv_counts``: int32 ``(B, H, NQ)``, each in ``[1, min(K, NK)]``.

:func:`mask_to_indices` / :func:`indices_to_mask` convert from / to a dense
boolean block mask ``(B, H, NQ, NK)``.

Query token ``i`` (in block ``p = i // block_size``) attends key token ``j`` iff
``j // block_size`` is selected for ``(b, h, p)`` and, when ``key_padding_mask``
``(B, L)`` bool is given, ``key_padding_mask[b, j]`` is True. A query row whose
allowed keys are all padded out gets output 0 and log-sum-exp ``-inf``.

``dense_query_blocks=(a, b)`` (optional): query blocks ``a <= p < b`` attend every key block
and their rows of ``kv_indices`` / ``kv_counts`` are not read, so a caller whose few rows are
dense (a text sink) need not widen every row of ``kv_indices`` to ``NK`` for them: the Triton
backend runs those rows as a separate pass over one full list shared by every (batch, head).

:func:`pack_block_mask` / :func:`unpack_block_mask` store a bool block mask at one bit per
block (a cache of masks between calls: 1 bit per block against 16 for an int16 index at any
density above 1/16).

Layout everywhere is SDPA's: ``q, k, v`` of shape ``(B, H, L, D)``. Self-attention
only (k/v have the same ``L`` as q).

Backends: ``"triton"`` (a FlashAttention-2-style forward kernel, one program per
(query block, batch*head) looping over its key-block list; CUDA, or CPU tensors
while ``TRITON_INTERPRET=1`` is set: read at each launch, so it may be set after
import), ``"gather"`` (no kernel: each query block's selected key/value blocks are gathered
and attended with batched matmuls, a chunk of query blocks at a time; exact, its cost follows
the kept blocks; the default off CUDA), ``"flex"`` (FlexAttention with
``BlockMask.from_kv_blocks``; a comparison baseline), ``"reference"`` (dense masked softmax).
Note: if ``TRITON_INTERPRET=1`` is already set when ``triton.language`` is first imported,
Triton's own ``@jit`` helpers become interpreted and no kernel can be compiled for CUDA in that
process.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from ._common import check_qkv, compiled_flex_attention, pad_head_dim, triton_interpreting
from .tiles import SKIP_BOTTOM, SKIP_TOP, TileList, compact_columns, tile_attention

try:  # Triton is optional: without it only "flex" and "reference" run.
    import triton
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_flops",
    "mask_to_indices",
    "indices_to_mask",
    "pack_block_mask",
    "unpack_block_mask",
]

_BACKENDS = ("auto", "triton", "gather", "flex", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_BLOCK_SIZES = (16, 32, 64, 128)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- index helpers


def mask_to_indices(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense block mask ``(B, H, NQ, NK)`` bool -> ``(kv_indices, kv_counts)``.

    ``kv_indices`` is int32 ``(B, H, NQ, NK)``: each row's selected key blocks in
    ascending order, padded with ``-1``; ``kv_counts`` is int32 ``(B, H, NQ)``.
    A row with no selected block gets count 0 (which :func:`block_sparse_attention`
    rejects: every query block must keep at least one key block).
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise ValueError(
            f"block_mask must be a 4-D bool tensor (B, H, NQ, NK), got "
            f"{getattr(block_mask, 'dtype', type(block_mask).__name__)} {tuple(getattr(block_mask, 'shape', ()))}"
        )
    nk = block_mask.shape[-1]
    counts = block_mask.sum(-1, dtype=torch.int32)
    # stable sort of "not selected": selected columns first, in ascending order
    idx = torch.sort((~block_mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    pad = torch.arange(nk, device=block_mask.device, dtype=torch.int32) >= counts[..., None]
    return idx.masked_fill(pad, -1).contiguous(), counts.contiguous()


def _valid_entries(kv_indices: torch.Tensor, kv_counts: torch.Tensor) -> torch.Tensor:
    k = kv_indices.shape[-1]
    return torch.arange(k, device=kv_indices.device) < kv_counts[..., None].to(torch.long)


def indices_to_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, nk: int) -> torch.Tensor:
    """``(kv_indices, kv_counts)`` -> dense bool block mask ``(B, H, NQ, nk)``.

    Only the first ``kv_counts`` entries of each row are read; they must lie in ``[0, nk)``.
    """
    if not isinstance(nk, int) or isinstance(nk, bool) or nk <= 0:
        raise ValueError(f"nk must be a positive int, got {nk!r}")
    if not isinstance(kv_indices, torch.Tensor) or kv_indices.dim() != 4 or kv_indices.is_floating_point():
        raise ValueError(f"kv_indices must be a 4-D integer tensor (B, H, NQ, K), got {kv_indices!r:.80}")
    if (
        not isinstance(kv_counts, torch.Tensor)
        or kv_counts.is_floating_point()
        or tuple(kv_counts.shape) != tuple(kv_indices.shape[:3])
    ):
        raise ValueError(
            f"kv_counts must be an integer tensor of shape {tuple(kv_indices.shape[:3])}, "
            f"got {getattr(kv_counts, 'dtype', None)} {tuple(getattr(kv_counts, 'shape', ()))}"
        )
    valid = _valid_entries(kv_indices, kv_counts)
    idx = kv_indices.to(torch.long)
    if bool(((idx < 0) | (idx >= nk))[valid].any()):
        raise ValueError(f"kv_indices: valid entries must lie in [0, nk={nk})")
    dense = torch.zeros(*kv_indices.shape[:3], nk + 1, dtype=torch.bool, device=kv_indices.device)
    dense.scatter_(-1, torch.where(valid, idx, nk), True)  # invalid entries land in the dropped column nk
    return dense[..., :nk]


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_block_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(..., N)`` -> uint8 ``(..., ceil(N / 8))``: column ``c`` is bit ``c % 8`` (least
    significant first) of byte ``c // 8``; the bits past ``N`` in the last byte are 0."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 1:
        raise ValueError(f"mask must be a bool tensor (..., N), got {getattr(mask, 'dtype', type(mask).__name__)}")
    n = mask.shape[-1]
    padded = F.pad(mask.to(torch.uint8), (0, -n % 8)).unflatten(-1, (-1, 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (padded * weights).sum(-1, dtype=torch.uint8)


def unpack_block_mask(bits: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 ``(..., ceil(n / 8))`` from :func:`pack_block_mask` -> bool ``(..., n)``."""
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() < 1:
        raise ValueError(f"bits must be a uint8 tensor (..., ceil(n / 8)), got {getattr(bits, 'dtype', bits)!r:.60}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or bits.shape[-1] != -(-n // 8):
        raise ValueError(f"n must be an int with ceil(n / 8) = {bits.shape[-1]} (bits' last dim), got {n!r}")
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return ((bits[..., None] & weights) != 0).flatten(-2)[..., :n]


def _token_mask(kv_indices, kv_counts, block_size: int, L: int, key_padding_mask=None) -> torch.Tensor:
    """Dense ``(B, H, L, L)`` bool token mask (True = attend)."""
    nb = _cdiv(L, block_size)
    blocks = indices_to_mask(kv_indices, kv_counts, nb)
    tok = torch.arange(L, device=kv_indices.device) // block_size
    mask = blocks[:, :, tok][:, :, :, tok]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    return mask


# --------------------------------------------------------------------------- validation


def _check_selection(kv_indices: torch.Tensor, kv_counts: torch.Tensor, nb: int, dense=None) -> None:
    """Data-dependent checks of ``(kv_indices, kv_counts)``, with a single device sync; the rows of
    the ``dense`` query-block range are not read, so not checked."""
    kmax = min(kv_indices.shape[3], nb)
    read = torch.ones(nb, dtype=torch.bool, device=kv_counts.device)
    if dense is not None:
        read[dense[0]:dense[1]] = False
    valid = _valid_entries(kv_indices, kv_counts) & read[:, None]
    bad_count = ((kv_counts < 1) | (kv_counts > kmax)) & read
    bad_index = ((kv_indices < 0) | (kv_indices >= nb)) & valid
    # duplicates among the valid entries: invalid ones get distinct sentinels >= nb, then sort the rows
    cols = torch.arange(kv_indices.shape[3], device=kv_indices.device, dtype=torch.int32)
    keys = torch.sort(torch.where(valid, kv_indices, nb + cols), dim=-1).values
    dup = keys[..., 1:] == keys[..., :-1]
    flags = torch.stack([bad_count.any(), bad_index.any(), dup.any()]).tolist()
    if flags[0]:
        raise ValueError(f"kv_counts entries must lie in [1, min(K, NK)] = [1, {kmax}]")
    if flags[1]:
        raise ValueError(f"kv_indices: the first kv_counts entries of each row must lie in [0, NK={nb})")
    if flags[2]:
        raise ValueError("kv_indices: the first kv_counts entries of each row must be distinct")


def _check_dense_rows(dense_query_blocks, nb: int):
    """``None`` or ``(a, b)`` with ``0 <= a <= b <= nb`` -> ``None`` (no dense row) or ``(a, b)``."""
    if dense_query_blocks is None:
        return None
    d = dense_query_blocks
    if (not isinstance(d, (tuple, list)) or len(d) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in d) or not 0 <= d[0] <= d[1] <= nb):
        raise ValueError(f"dense_query_blocks must be None or (a, b) with 0 <= a <= b <= NQ = {nb}, got {d!r}")
    return (d[0], d[1]) if d[0] < d[1] else None


def _check_inputs(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask, backend, validate,
                  dense_query_blocks=None):
    """Validate everything; return ``(scale, dense)`` (``dense``: ``None`` or the query-block range)."""
    scale = check_qkv((("q", q), ("k", k), ("v", v)), key_padding_mask, scale)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if (
        not isinstance(block_size, int)
        or isinstance(block_size, bool)
        or block_size < 16
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    B, H, L, _ = q.shape
    if L == 0:
        raise ValueError("q/k/v sequence length L must be positive")
    nb = _cdiv(L, block_size)
    if not isinstance(kv_indices, torch.Tensor) or kv_indices.dtype != torch.int32 or kv_indices.dim() != 4:
        raise ValueError(
            f"kv_indices must be an int32 tensor (B, H, NQ, K), got "
            f"{getattr(kv_indices, 'dtype', type(kv_indices).__name__)} {tuple(getattr(kv_indices, 'shape', ()))}"
        )
    if tuple(kv_indices.shape[:3]) != (B, H, nb) or kv_indices.shape[3] == 0:
        raise ValueError(
            f"kv_indices must have shape (B, H, NQ, K) = ({B}, {H}, {nb}, K>=1) for L={L}, "
            f"block_size={block_size}; got {tuple(kv_indices.shape)}"
        )
    if not isinstance(kv_counts, torch.Tensor) or kv_counts.dtype != torch.int32:
        raise ValueError(
            f"kv_counts must be an int32 tensor (B, H, NQ), got {getattr(kv_counts, 'dtype', type(kv_counts).__name__)}"
        )
    if tuple(kv_counts.shape) != (B, H, nb):
        raise ValueError(f"kv_counts must have shape (B, H, NQ) = ({B}, {H}, {nb}), got {tuple(kv_counts.shape)}")
    for name, t in (("kv_indices", kv_indices), ("kv_counts", kv_counts)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on the same device as q ({q.device}), got {t.device}")
    dense = _check_dense_rows(dense_query_blocks, nb)
    if validate:
        _check_selection(kv_indices, kv_counts, nb, dense)
    return scale, dense


# --------------------------------------------------------------------------- reference


def block_sparse_attention_reference(
    q, k, v, kv_indices, kv_counts, *, block_size: int = 64, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, dense_query_blocks: tuple[int, int] | None = None,
):
    """Exact reference: dense ``(B, H, L, L)`` token mask, masked softmax.

    Computed in float32 (float64 for float64 inputs). Returns ``(out, lse)``: ``out``
    in ``q.dtype``, ``lse`` the natural-log row log-sum-exp ``(B, H, L)`` in the compute
    dtype. Rows with no allowed key: ``out = 0``, ``lse = -inf``.
    """
    scale, dense = _check_inputs(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask, "reference",
                                 True, dense_query_blocks)
    kv_indices, kv_counts = _full_rows(kv_indices, kv_counts, -(-q.shape[2] // block_size), dense)
    return _reference(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask)


def _full_rows(kv_indices, kv_counts, nb: int, dense):
    """The selection with the ``dense`` query-block rows written out as full lists (width ``NK``):
    for the backends that are not memory-critical (reference, flex)."""
    if dense is None:
        return kv_indices, kv_counts
    counts = kv_counts.clone()
    counts[:, :, dense[0]:dense[1]] = 0
    blocks = indices_to_mask(kv_indices, counts, nb)
    blocks[:, :, dense[0]:dense[1]] = True
    return mask_to_indices(blocks)


def _reference(q, k, v, kv_indices, kv_counts, block_size: int, scale: float, key_padding_mask):
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = _token_mask(kv_indices, kv_counts, block_size, q.shape[2], key_padding_mask)
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.matmul(torch.exp(s - safe[..., None]), v.to(cdt)).to(q.dtype)  # exp(-inf) = 0 on empty rows
    return out, lse


# --------------------------------------------------------------------------- gather (no kernel)


def _gather(q, k, v, kv_indices, kv_counts, block_size: int, scale: float, key_padding_mask,
            chunk_elems: int = 1 << 24, dense=None):
    """Exact block-sparse attention with batched matmuls over gathered key/value blocks.

    Per chunk of query blocks, each row's selected key blocks (padded to the chunk's longest
    list; padding slots masked) are gathered, scored against the row's queries, softmaxed and
    applied to the gathered values. Float32 compute (float64 for float64). At the video testbed's
    attention shape (2 x 3 heads x 4,624 tokens x 64, float32, 30% of 64-token blocks kept) on 2
    CPU threads it runs at 1.25x the speed of dense SDPA (``ditaccel bench sparsity --device cpu
    --threads 2 --tokens 4624 --heads 3 --head-dim 64 --batch 2 --kept 0.3 --dtype float32``,
    2026-11-25); the dense-mask reference materialises (B, H, L, L) scores and masks instead.
    ``dense``: ``None`` or the query-block range ``(a, b)`` that attends every key block (its rows
    of the selection are not read). Returns ``(out in q.dtype, lse)`` like :func:`_reference`."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, L, D = q.shape
    bs, dev = block_size, q.device
    nb = _cdiv(L, bs)
    pad = nb * bs - L
    qb, kb, vb = (F.pad(t.to(cdt), (0, 0, 0, pad)).view(B, H, nb, bs, D) for t in (q, k, v))
    key_ok = (torch.arange(nb * bs, device=dev) < L).expand(B, -1)
    if key_padding_mask is not None:
        key_ok = key_ok & F.pad(key_padding_mask, (0, pad), value=False)
    key_ok = key_ok.view(B, 1, nb, bs)
    bi = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hi = torch.arange(H, device=dev).view(1, H, 1, 1)
    counts = kv_counts.to(torch.long)
    if dense is not None:
        counts = counts.clone()
        counts[:, :, dense[0]:dense[1]] = 0  # done below, over every key block
    out = torch.zeros(B, H, nb, bs, D, dtype=cdt, device=dev)
    lse = torch.full((B, H, nb, bs), float("-inf"), dtype=cdt, device=dev)

    def attend(p0, p1, idx, slot):
        """Query blocks p0..p1-1 over their gathered key blocks ``idx`` (B, H, P, m), ``slot`` valid."""
        ok = (key_ok[bi, 0, idx] & slot[..., None]).flatten(-2)  # (B, H, P, m * bs)
        s = torch.einsum("bhpqd,bhpmkd->bhpqmk", qb[:, :, p0:p1] * scale, kb[bi, hi, idx]).flatten(-2)
        s.masked_fill_(~ok[:, :, :, None, :], float("-inf"))
        mx = s.amax(dim=-1, keepdim=True)
        s.sub_(torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)).exp_()  # exp(-inf) = 0: empty rows
        den = s.sum(dim=-1)
        o = torch.einsum("bhpqj,bhpjd->bhpqd", s, vb[bi, hi, idx].flatten(-3, -2))
        out[:, :, p0:p1] = o / den.clamp_min(torch.finfo(cdt).tiny)[..., None]  # empty rows: 0
        lse[:, :, p0:p1] = mx[..., 0] + torch.log(den)  # empty rows: -inf + log 0 = -inf

    widest = max(1, min(kv_indices.shape[-1], nb))
    step = max(1, chunk_elems // (B * H * widest * bs * max(bs, D)))
    for p0 in range(0, nb, step):
        p1 = min(nb, p0 + step)
        c = counts[:, :, p0:p1]
        m = int(c.max())
        if m == 0:
            continue
        slot = torch.arange(m, device=dev) < c[..., None]  # (B, H, P, m)
        attend(p0, p1, torch.where(slot, kv_indices[:, :, p0:p1, :m].to(torch.long), 0), slot)
    if dense is not None:
        step = max(1, chunk_elems // (B * H * nb * bs * max(bs, D)))
        for p0 in range(dense[0], dense[1], step):
            p1 = min(dense[1], p0 + step)
            idx = torch.arange(nb, device=dev).expand(B, H, p1 - p0, nb)
            attend(p0, p1, idx, torch.ones(B, H, p1 - p0, nb, dtype=torch.bool, device=dev))
    return out.view(B, H, nb * bs, D)[:, :, :L].to(q.dtype), lse.view(B, H, nb * bs)[:, :, :L]


# --------------------------------------------------------------------------- triton


def tile_list(kv_indices: torch.Tensor, kv_counts: torch.Tensor, block_size: int, query_blocks: int = 1) -> TileList:
    """The :class:`~ditaccel.kernels.tiles.TileList` of a block selection.

    ``query_blocks = 1``: each program handles one query block (``block_size`` rows).
    ``query_blocks = 2``: each program handles two consecutive query blocks (a 2·block_size-row
    tile, better suited to large tensor-core tiles): it visits the union of their key blocks,
    and entries only one of the two selected are flagged so the other half's rows skip them.
    """
    B, H, nq, K = kv_indices.shape
    if query_blocks == 1:
        return TileList(kv_indices.reshape(B * H, nq, K), kv_counts.reshape(B * H, nq), None, block_size, block_size)
    if query_blocks != 2:
        raise ValueError(f"query_blocks must be 1 or 2, got {query_blocks!r}")
    mask = indices_to_mask(kv_indices.reshape(B * H, nq, 1, K), kv_counts.reshape(B * H, nq, 1), nq)[:, :, 0]
    if nq % 2:
        mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    top, bottom = mask[:, 0::2], mask[:, 1::2]
    union = top | bottom
    idx, cnt = compact_columns(union)
    flags = ((union & ~top).to(torch.uint8) * SKIP_TOP) | ((union & ~bottom).to(torch.uint8) * SKIP_BOTTOM)
    flags = torch.gather(flags, -1, idx.long())
    return TileList(idx, cnt, flags.contiguous(), 2 * block_size, block_size)


def _triton_attention(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask, return_lse, query_blocks,
                      dense=None):
    if triton is None:
        raise ValueError("backend 'triton' needs the triton package")
    if not (q.is_cuda or triton_interpreting()):
        raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"backend 'triton' supports q dtypes {_TRITON_DTYPES}, got {q.dtype}")
    if block_size not in _TRITON_BLOCK_SIZES:
        raise ValueError(f"block_size for backend 'triton' must be one of {_TRITON_BLOCK_SIZES}, got {block_size}")
    if query_blocks is None:
        query_blocks = 1
    if query_blocks not in (1, 2) or query_blocks * block_size > 128:
        raise ValueError(f"query_blocks must be 1, or 2 with block_size <= 64; got {query_blocks!r}")
    if dense is None:
        tiles = tile_list(kv_indices, kv_counts, block_size, query_blocks)
        return tile_attention(q, k, v, tiles, scale=scale, key_padding_mask=key_padding_mask, return_lse=return_lse)
    # Two passes, one full-size output alive at a time: the dense rows over one list of every key
    # block shared by all (batch, head) (G = 1: NQ x NK int32, not B * H of them), kept as a row
    # slice; then the other rows (the dense ones get count 0), and the slice written back. Each
    # row is computed as if its full list were in one kernel call: the same output, bitwise.
    nb = kv_indices.shape[2]
    L = q.shape[2]
    r0, r1 = dense[0] * block_size, min(L, dense[1] * block_size)
    full = torch.arange(nb, device=q.device, dtype=torch.int32).expand(1, nb, nb).contiguous()
    rows = torch.zeros(1, nb, dtype=torch.int32, device=q.device)
    rows[:, dense[0]:dense[1]] = nb
    first = tile_attention(q, k, v, TileList(full, rows, None, block_size, block_size), scale=scale,
                           key_padding_mask=key_padding_mask, return_lse=return_lse)
    first = (first[0][:, :, r0:r1].clone(), first[1][:, :, r0:r1].clone()) if return_lse \
        else (first[:, :, r0:r1].clone(),)
    del full
    counts = kv_counts.clone()
    counts[:, :, dense[0]:dense[1]] = 0
    res = tile_attention(q, k, v, tile_list(kv_indices, counts, block_size, query_blocks), scale=scale,
                         key_padding_mask=key_padding_mask, return_lse=return_lse)
    for whole, part in zip(res if return_lse else (res,), first):
        whole[:, :, r0:r1] = part
    return res


# --------------------------------------------------------------------------- flex


@functools.lru_cache(maxsize=64)
def _ragged_mask_mod(L: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < L

    return mask_mod


def _flex_block_mask(kv_indices, kv_counts, block_size: int, L: int, key_padding_mask, eager: bool):
    """``BlockMask.from_kv_blocks`` for the selection (plus ragged-L / key-padding ``mask_mod``).

    Eager flex ignores the block structure (it evaluates ``mask_mod`` densely), so for
    eager use the block selection is folded into ``mask_mod`` as well.
    """
    from torch.nn.attention.flex_attention import BlockMask

    nb = _cdiv(L, block_size)
    blocks = indices_to_mask(kv_indices, kv_counts, nb)
    idx, cnt = mask_to_indices(blocks)  # full-width (NK) rows, as flex expects
    idx = idx.clamp_min(0)
    if eager or key_padding_mask is not None:
        kpm = key_padding_mask

        def mask_mod(b, h, q_idx, kv_idx):
            keep = kv_idx < L
            if kpm is not None:
                keep = keep & kpm[b, kv_idx]
            if eager:
                keep = keep & blocks[b, h, q_idx // block_size, kv_idx // block_size]
            return keep

        return BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(L, L))
    if L % block_size:  # only the key tail is masked
        return BlockMask.from_kv_blocks(
            cnt, idx, BLOCK_SIZE=block_size, mask_mod=_ragged_mask_mod(L), seq_lengths=(L, L)
        )
    # Nothing to mask inside a kept tile: every kept block is a "full" block (mask_mod skipped).
    return BlockMask.from_kv_blocks(
        torch.zeros_like(cnt), idx, full_kv_num_blocks=cnt, full_kv_indices=idx, BLOCK_SIZE=block_size,
        seq_lengths=(L, L),
    )


def _flex_forward(q, k, v, block_mask, scale: float, return_lse: bool, compiled: bool, block_size: int):
    from torch.nn.attention import flex_attention as fa

    d = q.shape[-1]
    if pad_head_dim(d) != d:  # zero-pad D: q.k unchanged, the extra v columns are dropped
        pad = (0, pad_head_dim(d) - d)
        res = _flex_forward(
            F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), block_mask, scale, return_lse, compiled, block_size
        )
        return (res[0][..., :d], res[1]) if return_lse else res[..., :d]
    fn = compiled_flex_attention() if compiled else fa.flex_attention
    kw = {}
    if compiled and block_size < 128:  # flex's default tiles (BLOCK_M up to 128) must divide the sparse block
        kw["kernel_options"] = {"BLOCK_M": block_size, "BLOCK_N": block_size}
    if return_lse:  # keep the kernel_options above
        kw.update({"return_aux": fa.AuxRequest(lse=True)} if hasattr(fa, "AuxRequest") else {"return_lse": True})
    with warnings.catch_warnings():  # eager flex warns it is unfused (dense scores): expected off CUDA
        warnings.simplefilter("ignore", UserWarning)
        res = fn(q, k, v, block_mask=block_mask, scale=scale, **kw)
    if not return_lse:
        return res
    out, aux = res
    return out, (aux.lse if hasattr(aux, "lse") else aux).float()


# --------------------------------------------------------------------------- public fast path


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    validate: bool = True,
    query_blocks: int | None = None,
    dense_query_blocks: tuple[int, int] | None = None,
):
    """Block-sparse self-attention, ``(B, H, L, D)`` in and out.

    Args:
        q, k, v: same shape, dtype and device.
        kv_indices: int32 ``(B, H, NQ, K)``, ``NQ = ceil(L / block_size)``: selected key
            blocks per query block; only the first ``kv_counts`` entries of a row are read
            (distinct, in ``[0, NK)``, any order).
        kv_counts: int32 ``(B, H, NQ)`` in ``[1, min(K, NK)]``.
        block_size: query and key block size in tokens, a power of two >= 16
            (``"triton"``: 16, 32, 64 or 128).
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_padding_mask: optional bool ``(B, L)``, True = key may be attended; applied on
            top of the block selection. A row left with no allowed key gets output 0 and
            lse ``-inf``.
        return_lse: also return the natural-log row log-sum-exp ``(B, H, L)`` float32.
        backend: ``"auto"`` (``"triton"`` on CUDA or while ``TRITON_INTERPRET=1`` is set,
            else ``"gather"``), ``"triton"`` (fp16 / bf16 / fp32;
            fp32 uses IEEE dots; any head dim, padded to a power of two with masking),
            ``"gather"`` (batched matmuls over the gathered key blocks, any device),
            ``"flex"`` (FlexAttention ``BlockMask.from_kv_blocks``; compiled on CUDA, eager
            elsewhere) or ``"reference"`` (:func:`block_sparse_attention_reference`).
        validate: run the data-dependent checks (counts in range, valid indices in range
            and distinct). They synchronise with the device; pass False inside CUDA graphs
            or once the indices are known good. Out-of-range indices with ``validate=False``
            read out of bounds in the Triton kernel.
        query_blocks: ``"triton"``: query blocks per program, 1 or 2 (see :func:`tile_list`);
            default 1.
        dense_query_blocks: ``None`` or ``(a, b)``, ``0 <= a <= b <= NQ``: query blocks
            ``a..b-1`` attend every key block (key padding still applies); their rows of
            ``kv_indices`` / ``kv_counts`` are not read (any content). ``"triton"`` runs them as a
            first pass over one full key-block list shared by every (batch, head), then the
            other rows, and writes the first pass's rows into the result (see
            :func:`_triton_attention`); ``"gather"`` runs them as extra chunks.

    Returns:
        ``out`` ``(B, H, L, D)`` in ``q.dtype``, and ``lse`` if ``return_lse``.
    """
    scale, dense = _check_inputs(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask, backend,
                                 validate, dense_query_blocks)
    if backend == "auto":
        backend = "triton" if triton is not None and (q.is_cuda or triton_interpreting()) else "gather"
    if backend == "triton":
        return _triton_attention(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask, return_lse,
                                 query_blocks, dense)
    if backend == "gather":
        out, lse = _gather(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask, dense=dense)
        return (out, lse.float()) if return_lse else out
    kv_indices, kv_counts = _full_rows(kv_indices, kv_counts, -(-q.shape[2] // block_size), dense)
    if backend == "flex":
        bm = _flex_block_mask(kv_indices, kv_counts, block_size, q.shape[2], key_padding_mask, eager=not q.is_cuda)
        return _flex_forward(q, k, v, bm, scale, return_lse, q.is_cuda, block_size)
    out, lse = _reference(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask)
    return (out, lse.float()) if return_lse else out


# --------------------------------------------------------------------------- accounting


def block_sparse_flops(
    kv_counts: torch.Tensor, block_size: int, L: int, head_dim: int, *, kv_indices: torch.Tensor | None = None
) -> float:
    """FLOPs of the kept tiles: ``4 * D * (query rows) * (key columns)`` summed over them
    (``2 * D`` each for ``q @ k^T`` and ``p @ v``).

    The last query block counts its real ``L - (NQ - 1) * block_size`` rows. Key blocks
    count ``block_size`` columns unless ``kv_indices`` is given, in which case the
    ragged last key block counts its real size too (then the result is exactly
    ``4 * D * #allowed (q, k) pairs``, key padding aside).
    """
    for name, val in (("block_size", block_size), ("L", L), ("head_dim", head_dim)):
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    nb = _cdiv(L, block_size)
    if not isinstance(kv_counts, torch.Tensor) or kv_counts.is_floating_point() or kv_counts.dim() < 1:
        raise ValueError(f"kv_counts must be an integer tensor (..., NQ), got {kv_counts!r:.80}")
    if kv_counts.shape[-1] != nb:
        raise ValueError(f"kv_counts last dim must be NQ = ceil(L / block_size) = {nb}, got {kv_counts.shape[-1]}")
    rows = torch.full((nb,), block_size, dtype=torch.float64, device=kv_counts.device)
    rows[-1] = L - (nb - 1) * block_size
    if kv_indices is None:
        cols = kv_counts.to(torch.float64) * block_size
    else:
        if not isinstance(kv_indices, torch.Tensor) or tuple(kv_indices.shape[:-1]) != tuple(kv_counts.shape):
            raise ValueError(
                f"kv_indices must have shape {tuple(kv_counts.shape)} + (K,), "
                f"got {tuple(getattr(kv_indices, 'shape', ()))}"
            )
        sizes = torch.full((nb,), block_size, dtype=torch.float64, device=kv_counts.device)
        sizes[-1] = L - (nb - 1) * block_size
        valid = _valid_entries(kv_indices, kv_counts)
        idx = kv_indices.to(torch.long)
        if bool(((idx < 0) | (idx >= nb))[valid].any()):
            raise ValueError(f"kv_indices: valid entries must lie in [0, NK={nb})")
        cols = torch.where(valid, sizes[idx.clamp(0, nb - 1)], 0.0).sum(-1)
    return float(4.0 * head_dim * (cols * rows).sum())
