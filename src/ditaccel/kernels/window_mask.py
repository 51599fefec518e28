"""The window pattern as data: a frozen, hashable :class:`WindowSpec` and its pure
FlexAttention-style ``mask_mod`` (:func:`window_mask_mod`) and dense mask.

The lowest layer of the window kernels: the generic tile kernel (``tiles``) reads the dense mask
for its reference, and ``window`` builds tiles, FlexAttention masks and chunks from the spec
(its docstring describes the patterns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_KINDS = ("band1d", "neighborhood2d", "neighborhood3d")
_TEXT_POSITIONS = ("prefix", "suffix")


def _int_pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)):
        raise ValueError(f"{name} must contain ints, got {value!r}")
    return (a, b)


def _int_triple(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value, value)
    try:
        a, b, c = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a triple of ints, got {value!r}") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b, c)):
        raise ValueError(f"{name} must contain ints, got {value!r}")
    return (a, b, c)


@dataclass(frozen=True)
class WindowSpec:
    """A window-attention pattern (frozen and hashable: usable as a cache key).

    Args:
        kind: ``"band1d"``, ``"neighborhood2d"`` or ``"neighborhood3d"``.
        grid: ``(gh, gw)`` visual token grid, row-major; ``N = gh * gw`` visual tokens.
            ``band1d`` only uses ``N``. Video: the frames stack their rows, ``gh = frames * rows``.
        radius: ``neighborhood2d``: ``(rh, rw)`` row / column radius on the grid.
            ``neighborhood3d``: ``(rt, rh, rw)`` frame / row / column radius, rows and columns
            within each frame (an int means all three).
            ``band1d``: a single radius ``r``; pass an int, it is stored as ``(r, r)``
            (a pair with two different values is rejected, so every band has a
            single canonical spec). Radii are inclusive: 0 keeps only the diagonal.
        text_tokens: number of un-windowed text tokens in the sequence.
        text_position: ``"prefix"`` (text first) or ``"suffix"`` (text last).
        frames: ``neighborhood3d``: the frames stacked in ``gh`` (it must divide ``gh``); 1 for
            the other kinds.
    """

    kind: str
    grid: tuple[int, int]
    radius: tuple[int, ...]
    text_tokens: int = 0
    text_position: str = "prefix"
    frames: int = 1

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        grid = _int_pair(self.grid, "grid")
        if grid[0] <= 0 or grid[1] <= 0:
            raise ValueError(f"grid must be positive, got {grid}")
        three = self.kind == "neighborhood3d"
        radius = _int_triple(self.radius, "radius") if three else _int_pair(self.radius, "radius")
        if any(r < 0 for r in radius):
            raise ValueError(f"radius must be non-negative, got {radius}")
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"frames must be a positive int, got {self.frames!r}")
        if self.kind != "neighborhood3d" and self.frames != 1:
            raise ValueError(f"frames: only neighborhood3d windows use frames (got {self.frames} for {self.kind})")
        if grid[0] % self.frames:
            raise ValueError(f"frames: {self.frames} frames do not divide the grid's {grid[0]} rows")
        if self.kind == "band1d" and radius[0] != radius[1]:
            raise ValueError(f"radius for band1d must be a single int r (stored as (r, r)), got {radius}")
        if not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"text_tokens must be a non-negative int, got {self.text_tokens!r}")
        if self.text_position not in _TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {_TEXT_POSITIONS}, got {self.text_position!r}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "radius", radius)

    @classmethod
    def band(cls, grid, radius: int, text_tokens: int = 0, text_position: str = "prefix") -> "WindowSpec":
        """1D band of half-width ``radius`` over the row-major flattened grid."""
        return cls("band1d", grid, radius, text_tokens, text_position)

    @classmethod
    def neighborhood(cls, grid, radius, text_tokens: int = 0, text_position: str = "prefix") -> "WindowSpec":
        """2D neighborhood with ``radius = (rh, rw)`` (an int means rh = rw)."""
        return cls("neighborhood2d", grid, radius, text_tokens, text_position)

    @classmethod
    def neighborhood3d(cls, grid, frames: int, radius, text_tokens: int = 0,
                       text_position: str = "prefix") -> "WindowSpec":
        """3D spatio-temporal neighbourhood on ``frames`` stacked frames: ``radius = (rt, rh, rw)``."""
        return cls("neighborhood3d", grid, radius, text_tokens, text_position, frames)

    @classmethod
    def paper_default(cls, grid, text_tokens: int = 0, text_position: str = "prefix") -> "WindowSpec":
        """DiTFastAttn default: ``band1d`` with radius ``N // 8`` (N = visual tokens)."""
        return cls.band(grid, cls.default_radius(grid), text_tokens, text_position)

    @staticmethod
    def default_radius(grid) -> int:
        """Paper default band radius: ``N // 8`` (floor), ``N = gh * gw``."""
        gh, gw = _int_pair(grid, "grid")
        return (gh * gw) // 8

    @property
    def num_visual(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.num_visual + self.text_tokens

    @property
    def visual_offset(self) -> int:
        """Sequence index of the first visual token."""
        return self.text_tokens if self.text_position == "prefix" else 0


# --------------------------------------------------------------------------- masks


def window_mask_mod(spec: WindowSpec):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` for ``spec``.

    Pure tensor ops: works under ``create_block_mask`` (vmap) and on broadcast
    index tensors. ``b`` and ``h`` are ignored.
    """
    n, off, gw = spec.num_visual, spec.visual_offset, spec.grid[1]
    rt, rh, rw = spec.radius if spec.kind == "neighborhood3d" else (0, *spec.radius)
    per_frame = n // spec.frames  # visual tokens of one frame
    has_text = spec.text_tokens > 0
    kind = spec.kind

    def mask_mod(b, h, q_idx, kv_idx):
        qv, kv = q_idx - off, kv_idx - off
        if kind == "band1d":
            allowed = (qv - kv).abs() <= rh
        elif kind == "neighborhood2d":
            allowed = ((qv // gw - kv // gw).abs() <= rh) & ((qv % gw - kv % gw).abs() <= rw)
        else:  # frame, row within the frame, column
            qf, kf, qp, kp = qv // per_frame, kv // per_frame, qv % per_frame, kv % per_frame
            allowed = (((qf - kf).abs() <= rt) & ((qp // gw - kp // gw).abs() <= rh)
                       & ((qp % gw - kp % gw).abs() <= rw))
        if has_text:
            allowed = allowed | (qv < 0) | (qv >= n) | (kv < 0) | (kv >= n)
        return allowed

    return mask_mod


def _mask_rows(spec: WindowSpec, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Mask block for global query indices ``q_idx`` x key indices ``kv_idx``."""
    return window_mask_mod(spec)(None, None, q_idx[:, None], kv_idx[None, :])


def window_dense_mask(spec: WindowSpec, device=None) -> torch.Tensor:
    """Exact ``(L, L)`` boolean mask (True = attend), from :func:`window_mask_mod`."""
    idx = torch.arange(spec.seq_len, device=device)
    return _mask_rows(spec, idx, idx)
