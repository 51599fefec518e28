"""ditaccel's attention kernels as PyTorch custom operators (``torch.ops.ditaccel.*``), for code
that ``torch.compile`` traces.

Traced by Dynamo, a kernel's Python side (tile lists cached with ``functools.lru_cache``,
host syncs such as ``int(counts.max())``, data-dependent checks) breaks the graph, and a Triton
launch it does reach is handed to Inductor, which compiles the kernel again itself (on an H200,
torch 2.11 / Triton 3.6, that failed on the tile kernel's ``tl.dot``). A custom operator is one
opaque node instead: Dynamo and Inductor see only its output shapes (the fake implementation
below), and at run time the public entry point of the kernel runs exactly as in eager mode,
Triton launch included. ``torch.library.custom_op`` rather than ``triton_op`` on purpose:
``triton_op`` exposes the Triton kernel to Inductor, which is what failed.

The wrappers here take the same arguments as the kernels' public functions
(:func:`~ditaccel.kernels.window.window_attention`,
:func:`~ditaccel.kernels.window_residual.full_and_window_attention`,
:func:`~ditaccel.kernels.block_sparse.block_sparse_attention`,
:func:`~ditaccel.kernels.block_mass.attention_with_lse`,
:func:`~ditaccel.kernels.block_mass.block_mass`) and give the same results; a
:class:`~ditaccel.kernels.window.WindowSpec` travels as seven ints. Outputs are contiguous
``(B, H, L, D)`` tensors (a custom operator's outputs must not alias its inputs, and its fake
implementation must state their layout). Inference only: no autograd formula is registered.

ditaccel's own runtime does not need these: its attention processors run outside the compiled
graph (``torch.compiler.disable``, see :mod:`ditaccel.runtime`), so their kernels launch eagerly
under ``torch.compile`` of a transformer. These operators are for compiled code that calls the
kernels itself (``tests/test_compile.py`` compiles them with ``fullgraph=True``).
"""

from __future__ import annotations

import functools

import torch

from .block_mass import attention_with_lse as _attention_with_lse
from .block_mass import block_mass as _block_mass
from .block_sparse import block_sparse_attention as _block_sparse_attention
from .window import WindowSpec
from .window import window_attention as _window_attention
from .window_residual import full_and_window_attention as _full_and_window_attention

__all__ = ["attention_with_lse", "block_mass", "block_sparse_attention", "full_and_window_attention", "spec_from_ints",
           "spec_to_ints", "window_attention"]

_KIND_CODES = {"band1d": 0, "neighborhood2d": 1, "neighborhood3d": 2}
_KINDS = tuple(_KIND_CODES)


def spec_to_ints(spec: WindowSpec) -> list[int]:
    """``[kind, gh, gw, rh, rw, text_tokens, prefix, frames, rt]``: a ``WindowSpec`` as an operator
    argument (``rt`` = 0 and ``frames`` = 1 but for ``neighborhood3d``)."""
    if not isinstance(spec, WindowSpec):
        raise ValueError(f"spec must be a WindowSpec, got {type(spec).__name__}")
    rt, rh, rw = spec.radius if spec.kind == "neighborhood3d" else (0, *spec.radius)
    return [_KIND_CODES[spec.kind], *spec.grid, rh, rw, spec.text_tokens, int(spec.text_position == "prefix"),
            spec.frames, rt]


@functools.lru_cache(maxsize=256)
def _spec(ints: tuple[int, ...]) -> WindowSpec:
    kind, gh, gw, rh, rw, text, prefix, frames, rt = ints
    radius = (rt, rh, rw) if _KINDS[kind] == "neighborhood3d" else (rh, rw)
    return WindowSpec(_KINDS[kind], (gh, gw), radius, text, "prefix" if prefix else "suffix", frames)


def spec_from_ints(ints) -> WindowSpec:
    """The inverse of :func:`spec_to_ints`."""
    return _spec(tuple(int(x) for x in ints))


def _empty(q: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return q.new_empty(q.shape if shape is None else shape, dtype=dtype or q.dtype)


def _nb(length, block_size: int):
    return -(-length // block_size)


# ------------------------------------------------------------------------------ window
@torch.library.custom_op("ditaccel::window_attention", mutates_args=())
def _window_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: list[int], scale: float | None,
               backend: str, chunk_size: int | None, block_size: int) -> torch.Tensor:
    return _window_attention(q, k, v, spec_from_ints(spec), scale=scale, backend=backend,
                                    chunk_size=chunk_size, block_size=block_size).contiguous()


@_window_op.register_fake
def _(q, k, v, spec, scale, backend, chunk_size, block_size):
    return _empty(q)


def window_attention(q, k, v, spec: WindowSpec, scale: float | None = None, backend: str = "auto",
                     chunk_size: int | None = None, block_size: int = 128) -> torch.Tensor:
    """:func:`ditaccel.kernels.window.window_attention` as ``torch.ops.ditaccel.window_attention``."""
    return _window_op(q, k, v, spec_to_ints(spec), scale, backend, chunk_size, block_size)


@torch.library.custom_op("ditaccel::full_and_window_attention", mutates_args=())
def _full_window_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: list[int], scale: float | None,
                    backend: str, block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    full, win = _full_and_window_attention(q, k, v, spec_from_ints(spec), scale=scale, backend=backend,
                                                    block_size=block_size)
    return full.contiguous(), win.contiguous()


@_full_window_op.register_fake
def _(q, k, v, spec, scale, backend, block_size):
    return _empty(q), _empty(q)


def full_and_window_attention(q, k, v, spec: WindowSpec, *, scale: float | None = None, backend: str = "auto",
                              block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ditaccel.kernels.window_residual.full_and_window_attention` as
    ``torch.ops.ditaccel.full_and_window_attention``: ``(out_full, out_window)``."""
    return _full_window_op(q, k, v, spec_to_ints(spec), scale, backend, block_size)


# ------------------------------------------------------------------------------ block-sparse
@torch.library.custom_op("ditaccel::block_sparse_attention", mutates_args=())
def _block_sparse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                     kv_counts: torch.Tensor, block_size: int, scale: float | None,
                     key_padding_mask: torch.Tensor | None, return_lse: bool, backend: str, validate: bool,
                     query_blocks: int | None, dense_query_blocks: list[int] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    res = _block_sparse_attention(
        q, k, v, kv_indices, kv_counts, block_size=block_size, scale=scale, key_padding_mask=key_padding_mask,
        return_lse=return_lse, backend=backend, validate=validate, query_blocks=query_blocks,
        dense_query_blocks=None if dense_query_blocks is None else tuple(dense_query_blocks))
    out, lse = res if return_lse else (res, q.new_empty(0, dtype=torch.float32))
    return out.contiguous(), lse.contiguous()


@_block_sparse_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask, return_lse, backend, validate,
      query_blocks, dense_query_blocks):
    return _empty(q), _empty(q, q.shape[:3] if return_lse else (0,), torch.float32)


def block_sparse_attention(q, k, v, kv_indices, kv_counts, *, block_size: int = 64, scale: float | None = None,
                           key_padding_mask: torch.Tensor | None = None, return_lse: bool = False,
                           backend: str = "auto", validate: bool = True, query_blocks: int | None = None,
                           dense_query_blocks: tuple[int, int] | None = None):
    """:func:`ditaccel.kernels.block_sparse.block_sparse_attention` as
    ``torch.ops.ditaccel.block_sparse_attention``: ``out``, or ``(out, lse)`` with ``return_lse``."""
    out, lse = _block_sparse_op(q, k, v, kv_indices, kv_counts, block_size, scale, key_padding_mask, return_lse,
                                backend, validate, query_blocks,
                                None if dense_query_blocks is None else list(dense_query_blocks))
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------ AdaSpa search
@torch.library.custom_op("ditaccel::attention_with_lse", mutates_args=())
def _attention_lse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                      key_padding_mask: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _attention_with_lse(q, k, v, scale=scale, key_padding_mask=key_padding_mask, backend=backend)
    return out.contiguous(), lse.float().contiguous()


@_attention_lse_op.register_fake
def _(q, k, v, scale, key_padding_mask, backend):
    return _empty(q), _empty(q, q.shape[:3], torch.float32)


def attention_with_lse(q, k, v, *, scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ditaccel.kernels.block_mass.attention_with_lse` as ``torch.ops.ditaccel.attention_with_lse``."""
    return _attention_lse_op(q, k, v, scale, key_padding_mask, backend)


@torch.library.custom_op("ditaccel::block_mass", mutates_args=())
def _block_mass_op(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_size: int, scale: float | None,
                   key_padding_mask: torch.Tensor | None, backend: str) -> torch.Tensor:
    return _block_mass(q, k, lse, block_size=block_size, scale=scale, key_padding_mask=key_padding_mask,
                            backend=backend).contiguous()


@_block_mass_op.register_fake
def _(q, k, lse, block_size, scale, key_padding_mask, backend):
    nb = _nb(q.shape[2], block_size)
    return _empty(q, (q.shape[0], q.shape[1], nb, nb), torch.float32)


def block_mass(q, k, lse, *, block_size: int = 64, scale: float | None = None,
               key_padding_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """:func:`ditaccel.kernels.block_mass.block_mass` as ``torch.ops.ditaccel.block_mass``."""
    return _block_mass_op(q, k, lse, block_size, scale, key_padding_mask, backend)
