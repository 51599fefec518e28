"""Full and window attention together (DiTFastAttn's window-residual step, DESIGN §7).

At a ``full`` step DiTFastAttn needs both the full attention output and the window attention
output (their difference is the cached residual). Computed separately, the in-window part of
``q @ k^T`` and ``P @ V`` is done twice (dense + window ≈ 1.25–1.4× dense). Here each (query
tile, key tile) is computed once, by two launches of the tile kernel
(:mod:`ditaccel.kernels.tiles`):

1. the window: the tiles the window touches (boundary tiles masked to the window), giving
   ``out_window`` and its log-sum-exp;
2. the complement: every other tile (boundary tiles masked to the outside), *starting from*
   the window pass's state (``m = lse, l = 1, acc = out_window``), which ends as the full
   softmax: ``out_full``. No merge pass; only the tiles the boundary cuts are visited twice.

Layout is SDPA's ``(B, H, L, D)``, self-attention, ``L == spec.seq_len``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tiles import available, tile_attention
from .window import (TILE_KERNEL_KINDS, WindowSpec, _check_inputs, window_attention, window_attention_reference,
                     window_tile_classes, window_tiles)

__all__ = ["full_and_window_attention", "full_and_window_attention_reference", "tile_classes"]

_BACKENDS = ("auto", "triton", "reference")
_BLOCK_SIZES = (16, 32, 64, 128)


def tile_classes(spec: WindowSpec, block: int, device=None) -> torch.Tensor:
    """int8 ``(NB, NB)``, ``NB = ceil(L / block)``: for (query tile, key tile), 0 if every
    pair lies outside the window, 2 if every pair lies inside, 1 otherwise. Cached."""
    return window_tile_classes(spec, block, block, device)


def full_and_window_attention_reference(q, k, v, spec: WindowSpec, *, scale: float | None = None):
    """``(out_full, out_window)``: SDPA and :func:`window_attention_reference`, fp32 math
    (fp64 for fp64 inputs), both returned in ``q.dtype``."""
    scale = _check_inputs(q, k, v, spec, scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    full = F.scaled_dot_product_attention(q.to(cdt), k.to(cdt), v.to(cdt), scale=scale).to(q.dtype)
    return full, window_attention_reference(q, k, v, spec, scale)


def _triton_full_and_window(q, k, v, spec: WindowSpec, scale: float, block_size: int | None):
    if spec.kind not in TILE_KERNEL_KINDS:  # a pattern the tile kernel does not evaluate: two passes
        return F.scaled_dot_product_attention(q, k, v, scale=scale), window_attention(q, k, v, spec, scale=scale)
    if not available(q):
        raise ValueError("backend 'triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    bs = block_size or (128 if q.is_cuda else 64)
    inside = window_tiles(spec, "inside", bs, bs, q.device)
    outside = window_tiles(spec, "outside", bs, bs, q.device)
    out_w, lse_w = tile_attention(q, k, v, inside, scale=scale, window=spec, return_lse=True)
    if outside.max_count == 0:  # the window covers everything
        return out_w.clone(), out_w
    out_f = tile_attention(q, k, v, outside, scale=scale, window=spec, init=(out_w, lse_w))
    return out_f, out_w


def full_and_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: WindowSpec,
    *,
    scale: float | None = None,
    backend: str = "auto",
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_full, out_window)``, both ``(B, H, L, D)`` in ``q.dtype``, each tile computed once.

    ``out_full`` is plain softmax attention (``F.scaled_dot_product_attention``),
    ``out_window`` is :func:`~ditaccel.kernels.window.window_attention` with ``spec``.

    Args:
        q, k, v: same shape, dtype and device, ``L == spec.seq_len``.
        spec: the window pattern.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (``"triton"`` on CUDA or while ``TRITON_INTERPRET=1`` is set,
            else ``"reference"``), ``"triton"`` (fp16 / bf16 / fp32, any head dim; fp32 uses
            IEEE dots) or ``"reference"`` (:func:`full_and_window_attention_reference`).
        block_size: ``"triton"`` query/key tile (16, 32, 64 or 128); default 128 on CUDA,
            64 under the interpreter.
    """
    scale = _check_inputs(q, k, v, spec, scale)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if block_size is not None and (isinstance(block_size, bool) or block_size not in _BLOCK_SIZES):
        raise ValueError(f"block_size must be one of {_BLOCK_SIZES}, got {block_size!r}")
    if backend == "auto":
        backend = "triton" if available(q) else "reference"
    if backend == "triton":
        return _triton_full_and_window(q, k, v, spec, scale, block_size)
    return full_and_window_attention_reference(q, k, v, spec, scale=scale)
