"""Attention kernels used by ditaccel (model- and method-agnostic)."""

from .block_sparse import (
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_flops,
    indices_to_mask,
    mask_to_indices,
)
from .block_mass import attention_with_lse, attention_with_lse_reference, block_mass, block_mass_reference

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
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_flops",
    "indices_to_mask",
    "mask_to_indices",
    "attention_with_lse",
    "attention_with_lse_reference",
    "block_mass",
    "block_mass_reference",
    "WindowSpec",
    "window_attention",
    "window_attention_reference",
    "window_dense_mask",
    "window_mask_mod",
    "window_pair_fraction",
    "window_tile_fraction",
]
