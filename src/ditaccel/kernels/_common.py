"""Shared by the kernels: input checks ((B, H, L, D) tensors, key-padding masks, softmax scale),
head-dim padding, the Triton interpreter switch and the one compiled FlexAttention."""

from __future__ import annotations

import functools
import math
import os

import torch


def check_qkv(tensors, key_padding_mask=None, scale=None) -> float:
    """Validate ``(name, tensor)`` pairs (first one is q), mask and scale; return the scale."""
    q = tensors[0][1]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in tensors[1:]:
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the same shape as q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the same dtype as q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the same device as q ({q.device}), got {t.device}")
    B, H, L, D = q.shape
    if L == 0 or D == 0:
        raise ValueError(f"q must have L > 0 and D > 0, got shape {tuple(q.shape)}")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"key_padding_mask must be a bool tensor, got {got}")
        if tuple(m.shape) != (B, L):
            raise ValueError(f"key_padding_mask must have shape (B, L) = {(B, L)}, got {tuple(m.shape)}")
        if m.device != q.device:
            raise ValueError(f"key_padding_mask must be on the same device as q ({q.device}), got {m.device}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def pad_head_dim(d: int) -> int:
    """The power-of-two head dim (≥ 16) a kernel pads ``d`` to."""
    return max(16, 1 << (d - 1).bit_length())


def split_head_dim(d: int) -> tuple[int, int, bool]:
    """``(BLOCK_D0, BLOCK_D1, SPLIT_D)``: a kernel covers head dim ``d`` with a power-of-two part
    plus, when that saves work, a small power-of-two tail: 72 -> 64 + 16 (80 columns, not 128)."""
    p = pad_head_dim(d)
    if p == d or d <= 16:
        return p, 16, False
    d0 = p // 2
    d1 = pad_head_dim(d - d0)
    if d0 + d1 >= p:  # the tail is as wide as the head: no gain from splitting
        return p, 16, False
    return d0, d1, True


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read now:
    kernels are jitted lazily so that they follow the variable as it is at first use."""
    try:
        import triton
    except ImportError:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    """``torch.compile``'d FlexAttention (static shapes), built once on first use and shared by
    every kernel's flex path (dynamo keys its cache on flex_attention's code either way)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
