"""Attention kernels used by ditaccel (model- and method-agnostic)."""

from .window import (
    WindowSpec,
    window_attention,
    window_attention_reference,
    window_dense_mask,
    window_mask_mod,
    window_pair_fraction,
    window_tile_fraction,
)

__all__ = [
    "WindowSpec",
    "window_attention",
    "window_attention_reference",
    "window_dense_mask",
    "window_mask_mod",
    "window_pair_fraction",
    "window_tile_fraction",
]
