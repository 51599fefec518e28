"""Window attention over the visual tokens of a Diffusion Transformer.

A window pattern is described by a frozen, hashable :class:`WindowSpec`; the
pattern itself is a pure FlexAttention-style ``mask_mod`` (:func:`window_mask_mod`)
handed to one generic kernel:

* ``band1d``: visual tokens flattened row-major; query ``i`` sees key ``j`` iff
  ``|i - j| <= r``.
* ``neighborhood2d``: visual tokens form a ``(gh, gw)`` row-major grid; query
  ``(r1, c1)`` sees key ``(r2, c2)`` iff ``|r1 - r2| <= rh and |c1 - c2| <= rw``.
* ``neighborhood3d``: the grid stacks ``frames`` frames of ``gh / frames`` rows; query
  ``(f1, r1, c1)`` sees key ``(f2, r2, c2)`` iff ``|f1 - f2| <= rt``, ``|r1 - r2| <= rh`` and
  ``|c1 - c2| <= rw`` (rows within a frame). Run by the flex, chunked, sdpa_mask and reference
  backends (the Triton tile kernel evaluates the two other patterns only).

Optional text tokens (``text_tokens`` of them, before the visual tokens for
``text_position="prefix"``, after them for ``"suffix"``) are never windowed: a
text query sees every key, and every query sees every text key.

Layout everywhere is SDPA's: ``q, k, v`` of shape ``(B, H, L, D)`` with
``L == spec.seq_len``. Self-attention only (k/v have the same ``L`` as q).

A boolean key-padding mask ``(B, L)`` (True = attend; HunyuanVideo pads its text) may mask text
keys only (visual keys are always attended): every backend then runs on each distinct mask row's
unpadded tokens (padded text tokens dropped, the spec's ``text_tokens`` reduced to match), and a
padded text query, which is a text row, attends densely to the unpadded keys.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
import torch.nn.functional as F

from ._common import check_qkv, compiled_flex_attention, pad_head_dim
from .tiles import INSIDE, OUTSIDE, TileList, available, compact_columns, tile_attention, tma_available
from .window_mask import WindowSpec, _mask_rows, window_dense_mask, window_mask_mod

__all__ = [
    "WindowSpec",
    "window_mask_mod",
    "window_dense_mask",
    "window_attention_reference",
    "window_attention",
    "window_tile_fraction",
    "window_pair_fraction",
    "window_tile_classes",
    "window_tiles",
]

_BACKENDS = ("auto", "triton", "flex", "chunked", "sdpa_mask", "reference")
_OUTSIDE, _MIXED, _INSIDE = 0, 1, 2


# --------------------------------------------------------------------------- validation


def _check_inputs(q, k, v, spec, scale, backend=None, key_padding_mask=None) -> float:
    if not isinstance(spec, WindowSpec):
        raise ValueError(f"spec must be a WindowSpec, got {type(spec).__name__}")
    scale = check_qkv((("q", q), ("k", k), ("v", v)), key_padding_mask, scale)
    if q.shape[2] != spec.seq_len:
        raise ValueError(f"q/k/v sequence length L={q.shape[2]} must equal spec.seq_len={spec.seq_len}")
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return scale


# --------------------------------------------------------------------------- reference


def window_attention_reference(q, k, v, spec: WindowSpec, scale: float | None = None, return_lse: bool = False,
                               key_padding_mask: torch.Tensor | None = None):
    """Exact reference: ``softmax(mask(q @ k^T * scale)) @ v`` with the dense mask (and'ed with
    ``key_padding_mask``, ``(B, L)`` bool, True = attend, when given).

    Computed in float32 (float64 for float64 inputs); returns ``q.dtype``. With
    ``return_lse=True`` also returns the natural-log row log-sum-exp ``(B, H, L)``
    in the compute dtype.
    """
    scale = _check_inputs(q, k, v, spec, scale, key_padding_mask=key_padding_mask)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    allowed = window_dense_mask(spec, q.device)
    if key_padding_mask is not None:
        _check_padding_is_text(spec, key_padding_mask)
        allowed = allowed & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # every row attends at least to itself (never padded): finite
    out = torch.matmul(torch.exp(s - lse[..., None]), v.to(cdt)).to(q.dtype)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- tiles (Triton)


@functools.lru_cache(maxsize=32)
def _tile_classes_cached(spec: WindowSpec, block_m: int, block_n: int, device: str) -> torch.Tensor:
    L = spec.seq_len
    nq, nk = -(-L // block_m), -(-L // block_n)
    lk = nk * block_n
    keys = torch.arange(L, device=device)
    out = torch.empty(nq, nk, dtype=torch.int8, device=device)
    step = max(1, (1 << 25) // (block_m * lk))  # a few query tiles at a time: <= ~32M mask entries
    for p0 in range(0, nq, step):
        p1 = min(nq, p0 + step)
        rows = torch.arange(p0 * block_m, p1 * block_m, device=device)
        m = _mask_rows(spec, rows.clamp_max(L - 1), keys)  # (R, L)
        valid_row = (rows < L)[:, None]
        any_m = F.pad(m & valid_row, (0, lk - L), value=False)
        all_m = F.pad(m | ~valid_row, (0, lk - L), value=True)  # padded rows / keys never matter
        any_t = any_m.view(p1 - p0, block_m, nk, block_n).any(3).any(1)
        all_t = all_m.view(p1 - p0, block_m, nk, block_n).all(3).all(1)
        out[p0:p1] = torch.where(all_t, _INSIDE, torch.where(any_t, _MIXED, _OUTSIDE)).to(torch.int8)
    return out


def window_tile_classes(spec: WindowSpec, block_m: int = 128, block_n: int = 128, device=None) -> torch.Tensor:
    """int8 ``(NQT, NKT)`` for (query tile of ``block_m``, key tile of ``block_n``): 0 if every
    pair lies outside the window, 2 if every pair lies inside, 1 if the boundary cuts the tile.
    Cached per (spec, tiles, device)."""
    if not isinstance(spec, WindowSpec):
        raise ValueError(f"spec must be a WindowSpec, got {type(spec).__name__}")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    return _tile_classes_cached(spec, block_m, block_n, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=64)
def _window_tiles_cached(spec: WindowSpec, part: str, block_m: int, block_n: int, device: str) -> TileList:
    cls = window_tile_classes(spec, block_m, block_n, device)
    keep = cls != _OUTSIDE if part == "inside" else cls != _INSIDE
    idx, cnt = compact_columns(keep[None])
    most = int(cnt.max())
    idx = idx[..., : max(1, most)].contiguous()
    mixed = torch.gather((cls == _MIXED)[None], -1, idx.long())
    flags = (mixed.to(torch.uint8) * (INSIDE if part == "inside" else OUTSIDE)).contiguous()
    return TileList(idx, cnt, flags, block_m, block_n, most)


def window_tiles(spec: WindowSpec, part: str = "inside", block_m: int = 128, block_n: int = 128,
                 device=None) -> TileList:
    """The :class:`~ditaccel.kernels.tiles.TileList` of the window (``part="inside"``) or of
    its complement (``"outside"``): tiles wholly on that side run unmasked, tiles the boundary
    cuts carry the ``INSIDE`` / ``OUTSIDE`` flag. Shared by all batches and heads; cached."""
    if part not in ("inside", "outside"):
        raise ValueError(f"part must be 'inside' or 'outside', got {part!r}")
    return _window_tiles_cached(spec, part, block_m, block_n, str(torch.device(device or "cpu")))


#: window kinds the Triton tile kernel evaluates in-kernel
TILE_KERNEL_KINDS = ("band1d", "neighborhood2d")


def _triton_attention(q, k, v, spec: WindowSpec, scale: float, block_size: int):
    if spec.kind not in TILE_KERNEL_KINDS:
        raise ValueError(f"backend 'triton' runs {TILE_KERNEL_KINDS} windows, not {spec.kind!r}; "
                         "use 'flex' or 'chunked'")
    if not available(q):
        raise ValueError("backend 'triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    tiles = window_tiles(spec, "inside", block_size, block_size, q.device)
    return tile_attention(q, k, v, tiles, scale=scale, window=spec)


# --------------------------------------------------------------------------- flex (CUDA)


@functools.lru_cache(maxsize=64)
def _block_mask(spec: WindowSpec, device: str, block_size: int):
    from torch.nn.attention.flex_attention import create_block_mask

    L = spec.seq_len
    return create_block_mask(window_mask_mod(spec), None, None, L, L, device=device, BLOCK_SIZE=block_size)


# Head dims flex rejected once (per device type): afterwards they are zero-padded directly.
_FLEX_PAD_HEAD_DIMS: set[tuple[str, int]] = set()


def _flex_call(q, k, v, block_mask, scale, compiled: bool):
    if compiled:
        return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # eager flex warns it is unfused (dense scores): expected off CUDA
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def _flex_attention(q, k, v, spec, scale, block_size: int = 128, compiled: bool | None = None):
    if compiled is None:
        compiled = q.is_cuda
    block_mask = _block_mask(spec, str(q.device), block_size)
    d = q.shape[-1]
    key = (q.device.type, d)
    if key not in _FLEX_PAD_HEAD_DIMS:
        try:
            return _flex_call(q, k, v, block_mask, scale, compiled)
        except Exception:
            if pad_head_dim(d) == d:
                raise
            _FLEX_PAD_HEAD_DIMS.add(key)
    # Zero-pad D: q.k is unchanged, the extra v columns give zero outputs we drop.
    pad = (0, pad_head_dim(d) - d)
    out = _flex_call(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), block_mask, scale, compiled)
    return out[..., :d]


# --------------------------------------------------------------------------- chunked (CPU)


def _chunked_attention(q, k, v, spec: WindowSpec, scale: float, chunk_size: int | None):
    """Query chunks attend only to the key range their window can reach (+ text keys)."""
    L, n, off, t = spec.seq_len, spec.num_visual, spec.visual_offset, spec.text_tokens
    gh, gw = spec.grid
    rh, rw = spec.radius[-2:]
    text = (0, t) if spec.text_position == "prefix" else (n, L)
    out = torch.empty_like(q)

    def attend(qs: int, qe: int, key_ranges: list[tuple[int, int]]):
        q_idx = torch.arange(qs, qe)
        k_idx = torch.cat([torch.arange(s, e) for s, e in key_ranges])
        mask = _mask_rows(spec, q_idx, k_idx)
        mask = None if bool(mask.all()) else mask.to(q.device)
        if len(key_ranges) == 1:  # contiguous keys: views, no copy
            kk, vv = (x[:, :, key_ranges[0][0] : key_ranges[0][1]] for x in (k, v))
        else:
            kk, vv = (torch.cat([x[:, :, s:e] for s, e in key_ranges], dim=2) for x in (k, v))
        out[:, :, qs:qe] = F.scaled_dot_product_attention(q[:, :, qs:qe], kk, vv, attn_mask=mask, scale=scale)

    if t:  # text queries: full attention
        attend(*text, [(0, L)])

    if spec.kind == "neighborhood3d":  # per frame, a few rows at a time: key rows of the nearby frames
        rt = spec.radius[0]
        frames, rows_f = spec.frames, gh // spec.frames
        step = max(1, (chunk_size or max(64, rh * gw // 2)) // gw)
        for f in range(frames):
            for r0 in range(0, rows_f, step):
                r1 = min(rows_f, r0 + step)
                ranges = [((g * rows_f + max(0, r0 - rh)) * gw + off, (g * rows_f + min(rows_f, r1 + rh)) * gw + off)
                          for g in range(max(0, f - rt), min(frames, f + rt + 1))]
                if t:
                    ranges.append(text)
                attend((f * rows_f + r0) * gw + off, (f * rows_f + r1) * gw + off, _merged(ranges))
        return out

    # Visual query chunks [qs, qe) and the visual key range [ks, ke) their window can reach.
    if spec.kind == "band1d":
        step = chunk_size or max(64, rh // 2)
        chunks = [(qs, min(n, qs + step), max(0, qs - rh), min(n, qs + step + rh)) for qs in range(0, n, step)]
    else:
        rows = max(1, (chunk_size or max(64, rh * gw // 2)) // gw)
        chunks = [
            (r0 * gw, min(gh, r0 + rows) * gw, max(0, r0 - rh) * gw, min(gh, r0 + rows + rh) * gw)
            for r0 in range(0, gh, rows)
        ]
    for qs, qe, ks, ke in chunks:
        ranges = [(ks + off, ke + off)]
        if t:
            a, b = sorted([text, ranges[0]])
            ranges = [(a[0], b[1])] if a[1] == b[0] else [a, b]
        attend(qs + off, qe + off, ranges)
    return out


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[start, end)`` ranges with touching or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


# --------------------------------------------------------------------------- public fast path


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: WindowSpec,
    scale: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    block_size: int = 128,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Window attention, ``(B, H, L, D)`` in and out, ``L == spec.seq_len``.

    Args:
        q, k, v: same shape, dtype and device; any float dtype, any head dim.
        spec: the window pattern.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (``"triton"`` on Hopper-class GPUs where its tensor-descriptor loads
            apply, ``"flex"`` on other CUDA devices and for ``neighborhood3d``, ``"chunked"``
            elsewhere), ``"triton"`` (the
            tile kernel of :mod:`ditaccel.kernels.tiles` over the tiles the window touches,
            masking only those its boundary cuts; CUDA, or CPU under ``TRITON_INTERPRET=1``;
            on an H100 at head dim 72: 2.11 ms vs 2.60 for ``"flex"``, see BENCHMARKS.md),
            ``"flex"`` (FlexAttention with a cached block mask; compiled on CUDA,
            eager/unfused elsewhere; head dims flex rejects are zero-padded to a
            power of two), ``"chunked"`` (SDPA per query chunk over the reachable
            key range), ``"sdpa_mask"`` (SDPA with the dense boolean mask) or
            ``"reference"`` (:func:`window_attention_reference`).
        chunk_size: ``"chunked"`` query chunk in tokens (neighborhood2d rounds it
            down to whole grid rows, at least one); default ``max(64, r // 2)`` for
            band1d, ``max(64, rh * gw // 2)`` for neighborhood2d.
        block_size: ``"triton"`` tile / ``"flex"`` block-mask block size.
        key_padding_mask: ``(B, L)`` bool, True = attend, or ``None``. Only text tokens may be
            padded (``ValueError`` otherwise): see the module docstring.
    """
    scale = _check_inputs(q, k, v, spec, scale, backend, key_padding_mask)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size!r}")
    if key_padding_mask is not None and not bool(key_padding_mask.all()):
        if backend == "reference":
            return window_attention_reference(q, k, v, spec, scale, key_padding_mask=key_padding_mask)
        return _without_padding(q, k, v, spec, key_padding_mask, scale, lambda q_, k_, v_, s_: window_attention(
            q_, k_, v_, s_, scale=scale, backend=backend, chunk_size=chunk_size, block_size=block_size))
    if backend == "auto":
        tiles = spec.kind in TILE_KERNEL_KINDS and tma_available(q, k, v)
        backend = ("triton" if tiles else "flex") if q.is_cuda else "chunked"
    if backend == "triton":
        return _triton_attention(q, k, v, spec, scale, block_size)
    if backend == "flex":
        return _flex_attention(q, k, v, spec, scale, block_size)
    if backend == "chunked":
        return _chunked_attention(q, k, v, spec, scale, chunk_size)
    if backend == "sdpa_mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=window_dense_mask(spec, q.device), scale=scale)
    return window_attention_reference(q, k, v, spec, scale)


# --------------------------------------------------------------------------- key padding


def _text_range(spec: WindowSpec) -> tuple[int, int]:
    return (0, spec.text_tokens) if spec.text_position == "prefix" else (spec.num_visual, spec.seq_len)


def _check_padding_is_text(spec: WindowSpec, key_padding_mask: torch.Tensor) -> None:
    t0, t1 = _text_range(spec)
    padded = ~key_padding_mask
    if bool(padded[:, :t0].any() or padded[:, t1:].any()):
        raise ValueError("key_padding_mask: window attention accepts padding on text tokens only "
                         f"(sequence positions {t0}..{t1 - 1} here); a visual key is padded")


def _without_padding(q, k, v, spec: WindowSpec, key_padding_mask: torch.Tensor, scale: float, attend) -> torch.Tensor:
    """Window attention honouring a text key-padding mask with an unmasked backend: for each
    distinct mask row, ``attend(q, k, v, spec)`` runs on the unpadded tokens (the spec keeps the
    unpadded text tokens only), and the padded text queries attend densely to the unpadded keys."""
    _check_padding_is_text(spec, key_padding_mask)
    out = torch.empty_like(q)
    t0, t1 = _text_range(spec)
    patterns, which = torch.unique(key_padding_mask, dim=0, return_inverse=True)
    for i, keep in enumerate(patterns):
        rows = (which == i).nonzero().flatten()
        kept = keep.nonzero().flatten()
        sub = dataclasses.replace(spec, text_tokens=spec.text_tokens - int((~keep[t0:t1]).sum()))
        qs, ks, vs = q[rows], k[rows], v[rows]
        o = torch.empty_like(qs)
        o[:, :, kept] = attend(qs[:, :, kept], ks[:, :, kept], vs[:, :, kept], sub)
        padded = (~keep).nonzero().flatten()
        if len(padded):  # padded text queries: text rows, dense over the unpadded keys
            o[:, :, padded] = F.scaled_dot_product_attention(qs[:, :, padded], ks[:, :, kept], vs[:, :, kept],
                                                             scale=scale)
        out[rows] = o
    return out


# --------------------------------------------------------------------------- accounting


def _tile_and_pair_counts(spec: WindowSpec, block_q: int, block_k: int) -> tuple[int, int]:
    """(#tiles with any allowed pair, #allowed pairs), one query block at a time."""
    L = spec.seq_len
    nk = -(-L // block_k)
    keys = torch.arange(L)
    tiles = pairs = 0
    for qs in range(0, L, block_q):
        m = _mask_rows(spec, torch.arange(qs, min(L, qs + block_q)), keys)
        pairs += int(m.sum())
        cols = F.pad(m.any(0), (0, nk * block_k - L))
        tiles += int(cols.view(nk, block_k).any(1).sum())
    return tiles, pairs


def window_tile_fraction(spec: WindowSpec, block_q: int = 128, block_k: int = 128) -> float:
    """Fraction of the ``ceil(L/block_q) x ceil(L/block_k)`` tiles holding at least one
    allowed (q, k) pair: the tiles a block-sparse kernel computes. Exact."""
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q and block_k must be positive, got {block_q}, {block_k}")
    L = spec.seq_len
    tiles, _ = _tile_and_pair_counts(spec, block_q, block_k)
    return tiles / ((-(-L // block_q)) * (-(-L // block_k)))


def window_pair_fraction(spec: WindowSpec) -> float:
    """Exact fraction of allowed (q, k) pairs out of ``L * L``."""
    _, pairs = _tile_and_pair_counts(spec, 128, 128)
    return pairs / spec.seq_len**2
