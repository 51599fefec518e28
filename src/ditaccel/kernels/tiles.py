"""Attention over a list of (query tile, key tile) pairs: the one Triton kernel behind
block-sparse attention (AdaSpa), window attention and full + window attention (DiTFastAttn).

The sequence of ``L`` tokens is cut into query tiles of ``block_m`` and key tiles of
``block_n`` tokens. A :class:`TileList` names, for every query tile, the key tiles it
visits; a per-entry flag can restrict an entry to part of the tile:

* ``SKIP_TOP`` / ``SKIP_BOTTOM``: the first / second half of the query tile's rows do not
  attend this key tile (two query blocks of ``block_m / 2`` sharing one program, each with
  its own key-block selection: the union is visited, the halves masked);
* ``INSIDE`` / ``OUTSIDE``: only the (q, k) pairs inside / outside a window pattern
  (:class:`~ditaccel.kernels.window.WindowSpec`, evaluated in the kernel) are attended.

Entries with flag 0 run unmasked, so the masks cost only on the few tiles that need them.
The kernel is FlashAttention-2-style (one program per (query tile, batch * head), online
softmax in base 2, fp32 accumulators). With tensor-descriptor (TMA) loads, head dims that are
not a power of two are covered by two power-of-two parts (72 = 64 + 16, not 128). It can return the row log-sum-exp, and start
from an earlier pass's ``(out, lse)`` so that two passes over disjoint key sets give the
attention over their union with no merge pass.

Measured on an H100 (``ditaccel bench all``, BENCHMARKS.md, bf16, 2026-11-24): about 420 TFLOP/s
on kept tiles at head dim 128 against about 600-640 for cuDNN's dense attention; block-sparse
2.5x faster than compiled FlexAttention with 64-token blocks; the N/8 band window at head dim 72
(TMA loads) 2.11 ms against FlexAttention's 2.60 and dense SDPA's 6.78.

Layout is SDPA's: ``q, k, v`` of shape ``(B, H, L, D)``, self-attention. The kernel knows
nothing of the methods: callers turn their patterns into tile lists
(:func:`~ditaccel.kernels.block_sparse.block_sparse_attention`,
:func:`~ditaccel.kernels.window.window_attention`, ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._common import pad_head_dim, split_head_dim, triton_interpreting
from .window_mask import window_dense_mask

try:  # Triton is optional: callers fall back to their other backends without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None
    tl = None

__all__ = ["TileList", "tile_attention", "tile_attention_reference", "compact_columns", "SKIP_TOP", "SKIP_BOTTOM", "INSIDE", "OUTSIDE"]

SKIP_TOP, SKIP_BOTTOM, INSIDE, OUTSIDE = 1, 2, 4, 8
_TILE_SIZES = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TileList:
    """Which key tiles each query tile visits.

    Attributes:
        indices: int32 ``(G, NQT, K)``: key-tile ids; entries ``[:counts]`` of a row are used
            (distinct, in ``[0, NKT)``), the rest ignored. ``G`` is 1 (one list for every
            batch and head) or ``B * H`` (row ``b * H + h``).
        counts: int32 ``(G, NQT)``, each in ``[0, K]``; a query tile with count 0 gets output 0.
        flags: uint8 ``(G, NQT, K)`` (bit-or of ``SKIP_TOP``, ``SKIP_BOTTOM``, ``INSIDE``,
            ``OUTSIDE``) or ``None`` (all 0).
        block_m, block_n: query / key tile sizes (16, 32, 64 or 128).
        max_count: ``counts.max()`` when the builder knows it (saves a device sync), else None.
    """

    indices: torch.Tensor
    counts: torch.Tensor
    flags: torch.Tensor | None
    block_m: int
    block_n: int
    max_count: int | None = None

    def check(self, groups: int, L: int) -> None:
        """Shape / dtype checks (no device sync): raise ``ValueError`` naming the field."""
        if self.block_m not in _TILE_SIZES or self.block_n not in _TILE_SIZES:
            raise ValueError(f"block_m / block_n must be in {_TILE_SIZES}, got {self.block_m} / {self.block_n}")
        nqt = -(-L // self.block_m)
        idx, cnt = self.indices, self.counts
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int32 or idx.dim() != 3:
            raise ValueError(f"indices must be an int32 (G, NQT, K) tensor, got {getattr(idx, 'dtype', idx)!r}")
        if idx.shape[0] not in (1, groups) or idx.shape[1] != nqt or idx.shape[2] == 0:
            raise ValueError(f"indices must have shape (1 or {groups}, {nqt}, K>=1), got {tuple(idx.shape)}")
        if not isinstance(cnt, torch.Tensor) or cnt.dtype != torch.int32 or tuple(cnt.shape) != tuple(idx.shape[:2]):
            raise ValueError(f"counts must be an int32 tensor of shape {tuple(idx.shape[:2])}")
        if self.flags is not None and (self.flags.dtype != torch.uint8 or self.flags.shape != idx.shape):
            raise ValueError(f"flags must be a uint8 tensor of shape {tuple(idx.shape)} or None")


def compact_columns(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(..., N)`` -> (int32 ``(..., N)`` ids of the True columns in ascending order, then
    padding; int32 counts). A cumulative sum and one scatter: no sort."""
    n = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    pos = torch.cumsum(mask, -1, dtype=torch.int32) - 1
    pos = torch.where(mask, pos, n)  # unselected columns land in a dropped slot n
    cols = torch.arange(n, device=mask.device, dtype=torch.int32).expand_as(pos)
    out = torch.zeros(*mask.shape[:-1], n + 1, dtype=torch.int32, device=mask.device)
    return out.scatter_(-1, pos.long(), cols)[..., :n].contiguous(), counts


# --------------------------------------------------------------------------- kernel
# A plain function, jitted lazily by _kernel(): whether Triton interprets it (TRITON_INTERPRET=1) is
# read at first launch. Only builtins (tl.full, tl.reduce with the stdlib combiners) so that the CPU
# interpreter runs it even when triton.language was imported before the variable was set.


def _tile_attn_kernel(
    Q, K, V, Out, Lse, Idx, Cnt, Flg, Kpm, Init, InitLse,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, L, NQT, KMAX, LIST_G,
    N_VIS, OFF, GW, RH, RW,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr,
    HAS_FLAGS: tl.constexpr, HALF_ROWS: tl.constexpr, WINDOW: tl.constexpr, HAS_TEXT: tl.constexpr,
    HAS_KPM: tl.constexpr, STORE_LSE: tl.constexpr, EVEN_N: tl.constexpr, HAS_INIT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    d0_ok = offs_d0 < HEAD_DIM
    d1_ok = offs_d1 < HEAD_DIM
    m_ok = offs_m < L
    FAST_KV: tl.constexpr = EVEN_N and BLOCK_D0 <= HEAD_DIM

    q_rows = Q + off_b * stride_qb + off_h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qm
    q0 = tl.load(q_rows + offs_d0[None, :] * stride_qd, mask=m_ok[:, None] & d0_ok[None, :], other=0.0)
    if UPCAST_BF16:  # the interpreter's tl.dot mishandles bf16 (stored as uint16): dot in fp32
        q0 = q0.to(tl.float32)
    if SPLIT_D:
        q1 = tl.load(q_rows + offs_d1[None, :] * stride_qd, mask=m_ok[:, None] & d1_ok[None, :], other=0.0)
        if UPCAST_BF16:
            q1 = q1.to(tl.float32)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    if USE_TMA:  # K/V tiles by the tensor-memory accelerator: rows >= L and columns >= D come back 0
        kd0 = tl.make_tensor_descriptor(k_base, [L, HEAD_DIM], [stride_km, 1], [BLOCK_N, BLOCK_D0])
        vd0 = tl.make_tensor_descriptor(v_base, [L, HEAD_DIM], [stride_vm, 1], [BLOCK_N, BLOCK_D0])
        if SPLIT_D:
            kd1 = tl.make_tensor_descriptor(k_base, [L, HEAD_DIM], [stride_km, 1], [BLOCK_N, BLOCK_D1])
            vd1 = tl.make_tensor_descriptor(v_base, [L, HEAD_DIM], [stride_vm, 1], [BLOCK_N, BLOCK_D1])

    if WINDOW != 0:  # window coordinates of the query rows (text rows: qv outside [0, N_VIS))
        qv = offs_m - OFF
        q_r = qv // GW
        q_c = qv % GW
        q_text = (qv < 0) | (qv >= N_VIS)
    if HALF_ROWS:
        top = tl.arange(0, BLOCK_M) < BLOCK_M // 2
    # A finite start for the running max: a row whose keys are all masked so far keeps
    # m = -1e30 and p = exp2(-inf) = 0, never -inf - -inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc0 = tl.full([BLOCK_M, BLOCK_D0], 0.0, dtype=tl.float32)
    if SPLIT_D:
        acc1 = tl.full([BLOCK_M, BLOCK_D1], 0.0, dtype=tl.float32)
    if HAS_INIT:  # continue from an earlier pass: (out, lse) is the state m = lse (base 2), l = 1, acc = out
        init_rows = Init + off_b * stride_ob + off_h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_om
        lse0 = tl.load(InitLse + pid_bh.to(tl.int64) * L + offs_m, mask=m_ok, other=float("-inf"))
        seen = lse0 != float("-inf")
        m_i = tl.where(seen, lse0 * 1.4426950408889634, m_i)
        l_i = tl.where(seen, 1.0, l_i)
        acc0 = tl.load(init_rows + offs_d0[None, :] * stride_od, mask=m_ok[:, None] & d0_ok[None, :],
                       other=0.0).to(tl.float32)
        if SPLIT_D:
            acc1 = tl.load(init_rows + offs_d1[None, :] * stride_od, mask=m_ok[:, None] & d1_ok[None, :],
                           other=0.0).to(tl.float32)

    row = (pid_bh % LIST_G).to(tl.int64) * NQT + pid_m
    cnt = tl.load(Cnt + row)
    idx_ptr = Idx + row * KMAX
    flg_ptr = Flg + row * KMAX
    for j in range(0, cnt):
        kb = tl.load(idx_ptr + j)
        offs_k = kb * BLOCK_N + offs_n
        k_ok = offs_k < L
        k_rows = offs_k.to(tl.int64)[:, None]
        if USE_TMA:
            k0 = kd0.load([kb * BLOCK_N, 0])
        elif FAST_KV:
            k0 = tl.load(k_base + k_rows * stride_km + offs_d0[None, :] * stride_kd)
        else:
            k0 = tl.load(k_base + k_rows * stride_km + offs_d0[None, :] * stride_kd,
                         mask=k_ok[:, None] & d0_ok[None, :], other=0.0)
        if UPCAST_BF16:
            k0 = k0.to(tl.float32)
        qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
        if SPLIT_D:
            if USE_TMA:
                k1 = kd1.load([kb * BLOCK_N, BLOCK_D0])
            else:
                k1 = tl.load(k_base + k_rows * stride_km + offs_d1[None, :] * stride_kd,
                             mask=k_ok[:, None] & d1_ok[None, :], other=0.0)
            if UPCAST_BF16:
                k1 = k1.to(tl.float32)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
        if not EVEN_N:
            qk = tl.where(k_ok[None, :], qk, float("-inf"))
        if HAS_KPM:
            keep = tl.load(Kpm + off_b * L + offs_k, mask=k_ok, other=0) != 0
            qk = tl.where(keep[None, :], qk, float("-inf"))
        if HAS_FLAGS:
            f = tl.load(flg_ptr + j).to(tl.int32)
            if f != 0:
                if HALF_ROWS:
                    row_drop = tl.where(top, (f & 1) != 0, (f & 2) != 0)
                    qk = tl.where(row_drop[:, None], float("-inf"), qk)
                if WINDOW != 0:
                    kv = offs_k - OFF
                    if WINDOW == 1:
                        dd = qv[:, None] - kv[None, :]
                        win = (dd <= RH) & (dd >= -RH)
                    else:
                        dr = q_r[:, None] - (kv // GW)[None, :]
                        dc = q_c[:, None] - (kv % GW)[None, :]
                        win = (dr <= RH) & (dr >= -RH) & (dc <= RW) & (dc >= -RW)
                    if HAS_TEXT:
                        win = win | q_text[:, None] | ((kv < 0) | (kv >= N_VIS))[None, :]
                    drop = (win & ((f & 8) != 0)) | ((~win) & ((f & 4) != 0))
                    qk = tl.where(drop, float("-inf"), qk)
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc0 = acc0 * alpha[:, None]
        if SPLIT_D:
            acc1 = acc1 * alpha[:, None]
        if USE_TMA:
            v0 = vd0.load([kb * BLOCK_N, 0])
        elif FAST_KV:
            v0 = tl.load(v_base + k_rows * stride_vm + offs_d0[None, :] * stride_vd)
        else:
            v0 = tl.load(v_base + k_rows * stride_vm + offs_d0[None, :] * stride_vd,
                         mask=k_ok[:, None] & d0_ok[None, :], other=0.0)
        if UPCAST_BF16:  # keep the bf16 rounding of p, multiply in fp32
            p = p.to(tl.bfloat16).to(tl.float32)
            v0 = v0.to(tl.float32)
        pv = p.to(v0.dtype)
        acc0 = tl.dot(pv, v0, acc0, input_precision=DOT_PRECISION)
        if SPLIT_D:
            if USE_TMA:
                v1 = vd1.load([kb * BLOCK_N, BLOCK_D0])
            else:
                v1 = tl.load(v_base + k_rows * stride_vm + offs_d1[None, :] * stride_vd,
                             mask=k_ok[:, None] & d1_ok[None, :], other=0.0)
            if UPCAST_BF16:
                v1 = v1.to(tl.float32)
            acc1 = tl.dot(pv, v1, acc1, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    inv = 1.0 / tl.where(empty, 1.0, l_i)  # empty rows: acc is 0 -> output 0
    o_rows = Out + off_b * stride_ob + off_h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_om
    tl.store(o_rows + offs_d0[None, :] * stride_od, (acc0 * inv[:, None]).to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d0_ok[None, :])
    if SPLIT_D:
        tl.store(o_rows + offs_d1[None, :] * stride_od, (acc1 * inv[:, None]).to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & d1_ok[None, :])
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(Lse + pid_bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)


def _smem_bytes(kwargs, element_size: int, stages: int) -> int:
    width = kwargs["BLOCK_D0"] + (kwargs["BLOCK_D1"] if kwargs["SPLIT_D"] else 0)
    return 2 * kwargs["BLOCK_N"] * width * element_size * max(1, stages)  # K + V tiles per stage


def _fits(configs, named_args, kwargs):
    """The configs whose K/V pipeline stages fit in shared memory."""
    es = named_args["Q"].element_size()
    return [c for c in configs if _smem_bytes(kwargs, es, c.num_stages) <= 160 * 1024]


def _prune_configs(configs, named_args, **kwargs):
    """Default tuning: configs that fit, with the warp count that won on an H100
    (scripts/tune_tiles.py; the other lost by 1.3-2x): 4 warps for tiles of <= 64 query rows,
    8 for 128 (one / two warpgroups of 64 rows)."""
    warps = 8 if kwargs["BLOCK_M"] >= 128 else 4
    fit = [c for c in _fits(configs, named_args, kwargs) if c.num_warps == warps]
    return fit or [triton.Config({}, num_warps=warps, num_stages=1)]


def _prune_explicit(configs, named_args, **kwargs):
    """Caller-given configs: only drop those that do not fit."""
    return _fits(configs, named_args, kwargs) or [triton.Config({}, num_warps=4, num_stages=1)]


#: autotuned (num_warps, num_stages) candidates on the GPU (pruned per tile size)
CONFIGS = ((4, 2), (4, 3), (8, 2), (8, 3))


@functools.lru_cache(maxsize=8)
def _kernel(interpret: bool, configs: tuple | None = None):
    """The launchable kernel: autotuned over ``configs`` on the GPU, plain under the interpreter
    (where every config would be interpreted, slowly, for identical results)."""
    kernel = triton.jit(_tile_attn_kernel)
    if interpret:
        return kernel
    cfgs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in (configs or CONFIGS)]
    return triton.autotune(
        cfgs,
        key=["L", "BLOCK_M", "BLOCK_N", "HEAD_DIM", "HAS_FLAGS", "HALF_ROWS", "WINDOW", "HAS_KPM",
             "STORE_LSE", "EVEN_N", "HAS_INIT", "USE_TMA", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune_explicit if configs else _prune_configs},
    )(kernel)


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides, unit last stride."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _tma_scratch(size: int, alignment: int, stream):
    """Triton's allocator for in-kernel tensor descriptors (128 bytes per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.lru_cache(maxsize=1)
def _install_tma_allocator() -> None:
    """Give Triton the descriptor allocator once per process (not on every launch)."""
    triton.set_allocator(_tma_scratch)


def tma_available(*tensors) -> bool:
    """Whether the kernel would load these (CUDA) tensors through tensor descriptors: a device of
    compute capability >= 9 (Hopper) and TMA-compatible strides. That is the fast path (see the
    module docstring); callers pick the tile kernel over FlexAttention only there."""
    t = tensors[0]
    return (available(t) and t.is_cuda and not triton_interpreting()
            and torch.cuda.get_device_capability(t.device)[0] >= 9 and _tma_ok(*tensors))


def available(q: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on ``q`` here (CUDA, or the CPU interpreter)."""
    return triton is not None and q.dtype in _DTYPES and (q.is_cuda or triton_interpreting())


def tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: TileList,
    *,
    scale: float,
    window=None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    configs: tuple | None = None,
    tma: bool | None = None,
):
    """Attention of every query tile over its listed key tiles.

    Inputs are assumed validated by the caller (shapes, dtypes, devices; see the kernels
    that build on this). Returns ``out`` in ``q.dtype``, plus ``lse`` (natural log, float32
    ``(B, H, L)``, ``-inf`` on rows with no key) when ``return_lse``.

    Args:
        tiles: the :class:`TileList`.
        scale: softmax scale.
        window: a :class:`~ditaccel.kernels.window.WindowSpec` read by ``INSIDE`` /
            ``OUTSIDE`` entries (required if any flag has those bits).
        key_padding_mask: optional bool ``(B, L)``, True = key kept.
        init: ``(out0, lse0)`` of an earlier pass over *other* keys (``out0`` laid out like
            ``q``, ``lse0`` float32 ``(B, H, L)``): the result is then attention over the union
            of both passes' keys, with no separate merge (the earlier pass is the online-softmax
            state ``m = lse0, l = 1, acc = out0``).
        configs: ``(num_warps, num_stages)`` pairs to autotune over instead of :data:`CONFIGS`.
        tma: load K/V tiles through tensor descriptors (Hopper's TMA); default: on CUDA devices
            of compute capability >= 9 when the strides allow it.
    """
    if not available(q):
        raise ValueError("the Triton tile kernel needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    B, H, L, D = q.shape
    tiles.check(B * H, L)
    interpret = triton_interpreting()
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32) if return_lse else out
    cnt = tiles.counts.contiguous()
    idx = tiles.indices.contiguous()
    flg = tiles.flags.contiguous() if tiles.flags is not None else idx
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else cnt
    if window is not None:
        if window.kind not in ("band1d", "neighborhood2d"):
            raise ValueError(f"window: the tile kernel evaluates band1d and neighborhood2d windows, "
                             f"not {window.kind!r}")
        win = (1 if window.kind == "band1d" else 2, window.num_visual, window.visual_offset, window.grid[1],
               *window.radius, window.text_tokens > 0)
    else:
        win = (0, 0, 0, 1, 0, 0, False)
    if init is not None:
        init_out, init_lse = init
        if init_out.shape != q.shape or init_out.stride() != out.stride() or tuple(init_lse.shape) != (B, H, L):
            raise ValueError("init must be (out, lse) of an earlier pass on the same q: out laid out like q")
        init_lse = init_lse.float().contiguous()
    else:
        init_out = init_lse = out
    if tma is None:
        tma = tma_available(k, v)
    if tma and q.is_cuda:
        _install_tma_allocator()
    # 72 = 64 + 16 only with tensor-descriptor loads: Triton 3.6 miscompiles the split with masked
    # pointer loads on an H100 (NaN or illegal address), so pointer loads pad to a power of two.
    d0, d1, split = split_head_dim(D) if tma else (pad_head_dim(D), 16, False)
    nqt = idx.shape[1]
    _kernel(interpret, configs)[(nqt, B * H)](
        q, k, v, out, lse, idx, cnt, flg, kpm, init_out, init_lse,
        scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, L, nqt, idx.shape[2], idx.shape[0],
        win[1], win[2], win[3], win[4], win[5],
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, SPLIT_D=split,
        HAS_FLAGS=tiles.flags is not None, HALF_ROWS=tiles.flags is not None and window is None,
        WINDOW=win[0], HAS_TEXT=win[6], HAS_KPM=key_padding_mask is not None, STORE_LSE=return_lse,
        EVEN_N=L % tiles.block_n == 0, HAS_INIT=init is not None, USE_TMA=bool(tma),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_BF16=interpret and q.dtype == torch.bfloat16,
    )
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- reference


def tile_token_mask(tiles: TileList, B: int, H: int, L: int, window=None, device=None) -> torch.Tensor:
    """The dense ``(B, H, L, L)`` bool mask (True = attend) that a :class:`TileList` encodes."""
    device = device or tiles.indices.device
    nqt, nkt = -(-L // tiles.block_m), -(-L // tiles.block_n)
    G, _, K = tiles.indices.shape
    valid = torch.arange(K, device=device) < tiles.counts.to(device)[..., None].long()
    idx = torch.where(valid, tiles.indices.to(device).long(), nkt)  # unused entries land in column nkt
    flags = tiles.flags.to(device).long() if tiles.flags is not None else torch.zeros_like(idx)
    # per (query tile, key tile): visited?, flags
    visit = torch.zeros(G, nqt, nkt + 1, dtype=torch.bool, device=device).scatter_(-1, idx, True)[..., :nkt]
    flag = torch.zeros(G, nqt, nkt + 1, dtype=torch.long, device=device).scatter_(-1, idx, flags)[..., :nkt]
    qt = torch.arange(L, device=device) // tiles.block_m
    kt = torch.arange(L, device=device) // tiles.block_n
    vis = visit[:, qt][:, :, kt]  # (G, L, L)
    f = flag[:, qt][:, :, kt]
    top = (torch.arange(L, device=device) % tiles.block_m < tiles.block_m // 2)[None, :, None]
    drop = (top & (f & SKIP_TOP != 0)) | (~top & (f & SKIP_BOTTOM != 0))
    if window is not None:
        win = window_dense_mask(window, device)[None]
        drop = drop | (win & (f & OUTSIDE != 0)) | (~win & (f & INSIDE != 0))
    mask = vis & ~drop
    return mask.expand(B * H, L, L).reshape(B, H, L, L) if G == 1 else mask.view(B, H, L, L)


def tile_attention_reference(q, k, v, tiles: TileList, *, scale: float, window=None, key_padding_mask=None):
    """Exact float32 (float64 for float64) masked softmax over :func:`tile_token_mask`:
    ``(out, lse)``; rows with no key get ``out = 0``, ``lse = -inf``."""
    B, H, L, _ = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = tile_token_mask(tiles, B, H, L, window, q.device)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    s = (torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.matmul(torch.exp(s - safe[..., None]), v.to(cdt)).to(q.dtype)
    return out, lse
