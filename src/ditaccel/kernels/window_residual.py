"""Full and window attention in one pass over K/V (DiTFastAttn's window-residual step, DESIGN §7).

At a ``full`` step DiTFastAttn needs both the full attention output and the window
attention output (their difference is the cached residual). Computing them separately
reads K/V twice and redoes every in-window ``q @ k^T``. Here one FlashAttention-2-style
pass computes both: per query row the kernel keeps a single running max ``m`` (the full
softmax's) and two partial accumulators in that max's frame,

* ``(l_in, acc_in)``: keys inside the row's window (:func:`~ditaccel.kernels.window.window_mask_mod`),
* ``(l_out, acc_out)``: keys outside it,

so ``out_full = (acc_in + acc_out) / (l_in + l_out)`` and ``out_window = acc_in / l_in``.
Each ``P @ V`` product lands in exactly one accumulator except on key tiles the window
boundary cuts through (the host precomputes, per (query tile, key tile), whether the tile is
entirely outside every row's window, entirely inside, or mixed), so the matrix work is that
of dense attention plus the mixed tiles' second product.

Layout is SDPA's ``(B, H, L, D)``, self-attention, ``L == spec.seq_len``.

Status: correct (tested against the reference on CPU under the interpreter and on an H100) but
not yet fast: ``ditaccel bench attention`` on an H100 (2 x 16 x 16384 x 72, bf16, band N/8,
2026-11-24) gave 15.56 ms vs 6.72 ms dense and 9.24 ms for dense + window as two calls, so
``methods.ditfastattn`` does not use it yet. Suspected cause: four accumulators (in/out x the two head-dim parts of D=72) rescaled
every tile spill registers; next to try: always ``acc_full += P @ V`` plus ``acc_win`` only on
tiles the window touches.

Numerics: the window part is accumulated relative to the *full* row max. Every row's window
contains its own diagonal key, so ``l_in > 0`` unless the in-window scores sit more than
~87 nats (fp32 ``exp`` underflow) below the row's best out-of-window score; such a row
would get window output 0 (guarded, never NaN).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._common import pad_head_dim, triton_interpreting
from .window import WindowSpec, _check_inputs, _mask_rows, window_attention_reference

try:  # Triton is optional: without it only "reference" runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None
    tl = None

__all__ = ["full_and_window_attention", "full_and_window_attention_reference", "tile_classes"]

_BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_SIZES = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634
_OUTSIDE, _MIXED, _INSIDE = 0, 1, 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- tile classes


@functools.lru_cache(maxsize=32)
def _tile_classes_cached(spec: WindowSpec, block: int, device: str) -> torch.Tensor:
    L = spec.seq_len
    nb = _cdiv(L, block)
    lp = nb * block
    keys = torch.arange(L, device=device)
    out = torch.empty(nb, nb, dtype=torch.int8, device=device)
    # a few query tiles at a time: at most ~32M mask entries per step
    step = max(1, (1 << 25) // (block * lp))
    for p0 in range(0, nb, step):
        p1 = min(nb, p0 + step)
        rows = torch.arange(p0 * block, p1 * block, device=device)
        m = _mask_rows(spec, rows.clamp_max(L - 1), keys)  # (R, L)
        valid_row = (rows < L)[:, None]
        any_m = F.pad(m & valid_row, (0, lp - L), value=False)
        all_m = F.pad(m | ~valid_row, (0, lp - L), value=True)  # padded rows / keys never matter
        any_t = any_m.view(p1 - p0, block, nb, block).any(3).any(1)
        all_t = all_m.view(p1 - p0, block, nb, block).all(3).all(1)
        cls = torch.where(all_t, _INSIDE, torch.where(any_t, _MIXED, _OUTSIDE))
        out[p0:p1] = cls.to(torch.int8)
    return out


def tile_classes(spec: WindowSpec, block: int, device=None) -> torch.Tensor:
    """int8 ``(NB, NB)``, ``NB = ceil(L / block)``: for (query tile, key tile), 0 if every
    pair lies outside the window, 2 if every pair lies inside, 1 otherwise. Cached."""
    if not isinstance(spec, WindowSpec):
        raise ValueError(f"spec must be a WindowSpec, got {type(spec).__name__}")
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    return _tile_classes_cached(spec, block, str(torch.device(device or "cpu")))


# --------------------------------------------------------------------------- reference


def full_and_window_attention_reference(q, k, v, spec: WindowSpec, *, scale: float | None = None):
    """``(out_full, out_window)``: SDPA and :func:`window_attention_reference`, fp32 math
    (fp64 for fp64 inputs), both returned in ``q.dtype``."""
    scale = _check_inputs(q, k, v, spec, scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    full = F.scaled_dot_product_attention(q.to(cdt), k.to(cdt), v.to(cdt), scale=scale).to(q.dtype)
    return full, window_attention_reference(q, k, v, spec, scale)


# --------------------------------------------------------------------------- triton

# Plain function, jitted lazily by _triton_kernel() (TRITON_INTERPRET is honoured at first use).
# Only builtins (tl.full, tl.reduce with stdlib combine functions) so the CPU interpreter works
# even after triton.language was imported (see block_sparse.py).
# The head dim is covered by BLOCK_D0 (+ BLOCK_D1 when SPLIT_D): 72 -> 64 + 16 instead of 128.
def _fw_fwd_kernel(
    Q, K, V, OutF, OutW, Cls,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_fb, stride_fh, stride_fm, stride_fd,
    stride_wb, stride_wh, stride_wm, stride_wd,
    H, L, NB,
    N_VIS, OFF, GW, RH, RW,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    SPLIT_D: tl.constexpr, BAND: tl.constexpr, HAS_TEXT: tl.constexpr, EVEN_L: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    d0_ok = offs_d0 < HEAD_DIM
    d1_ok = offs_d1 < HEAD_DIM
    m_ok = offs_m < L
    EVEN_D0: tl.constexpr = BLOCK_D0 <= HEAD_DIM
    FAST: tl.constexpr = EVEN_L and EVEN_D0

    q_base = Q + off_b * stride_qb + off_h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qm
    q0 = tl.load(q_base + offs_d0[None, :] * stride_qd, mask=m_ok[:, None] & d0_ok[None, :], other=0.0)
    q1 = tl.load(q_base + offs_d1[None, :] * stride_qd, mask=m_ok[:, None] & d1_ok[None, :], other=0.0)
    if UPCAST_BF16:  # the interpreter's tl.dot mishandles bf16: dot in fp32
        q0 = q0.to(tl.float32)
        q1 = q1.to(tl.float32)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    # window coordinates of the query rows (text rows: qv outside [0, N_VIS))
    qv = offs_m - OFF
    q_r = qv // GW
    q_c = qv % GW
    q_text = (qv < 0) | (qv >= N_VIS)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)  # running max of the full row (log2 units)
    l_in = tl.full([BLOCK], 0.0, dtype=tl.float32)
    l_out = tl.full([BLOCK], 0.0, dtype=tl.float32)
    acc_in0 = tl.full([BLOCK, BLOCK_D0], 0.0, dtype=tl.float32)
    acc_out0 = tl.full([BLOCK, BLOCK_D0], 0.0, dtype=tl.float32)
    acc_in1 = tl.full([BLOCK, BLOCK_D1], 0.0, dtype=tl.float32)
    acc_out1 = tl.full([BLOCK, BLOCK_D1], 0.0, dtype=tl.float32)

    cls_ptr = Cls + pid_m.to(tl.int64) * NB
    for j in range(0, NB):
        cls = tl.load(cls_ptr + j)
        offs_k = j * BLOCK + offs_n
        k_ok = offs_k < L
        k_rows = offs_k.to(tl.int64)[:, None]
        if FAST:
            k0 = tl.load(k_base + k_rows * stride_km + offs_d0[None, :] * stride_kd)
        else:
            k0 = tl.load(k_base + k_rows * stride_km + offs_d0[None, :] * stride_kd,
                         mask=k_ok[:, None] & d0_ok[None, :], other=0.0)
        if UPCAST_BF16:
            k0 = k0.to(tl.float32)
        qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
        if SPLIT_D:
            k1 = tl.load(k_base + k_rows * stride_km + offs_d1[None, :] * stride_kd,
                         mask=k_ok[:, None] & d1_ok[None, :], other=0.0)
            if UPCAST_BF16:
                k1 = k1.to(tl.float32)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
        qk = qk * qk_scale
        if not EVEN_L:
            qk = tl.where(k_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
        p = tl.math.exp2(qk - m_new[:, None])  # every tile has >= 1 real key: m_new finite
        alpha = tl.math.exp2(m_i - m_new)
        m_i = m_new
        l_in = l_in * alpha
        l_out = l_out * alpha
        acc_in0 = acc_in0 * alpha[:, None]
        acc_out0 = acc_out0 * alpha[:, None]
        if SPLIT_D:
            acc_in1 = acc_in1 * alpha[:, None]
            acc_out1 = acc_out1 * alpha[:, None]

        if FAST:
            v0 = tl.load(v_base + k_rows * stride_vm + offs_d0[None, :] * stride_vd)
        else:
            v0 = tl.load(v_base + k_rows * stride_vm + offs_d0[None, :] * stride_vd,
                         mask=k_ok[:, None] & d0_ok[None, :], other=0.0)
        if SPLIT_D:
            v1 = tl.load(v_base + k_rows * stride_vm + offs_d1[None, :] * stride_vd,
                         mask=k_ok[:, None] & d1_ok[None, :], other=0.0)
        if UPCAST_BF16:  # keep the bf16 rounding of p, multiply in fp32
            p = p.to(tl.bfloat16).to(tl.float32)
            v0 = v0.to(tl.float32)
            if SPLIT_D:
                v1 = v1.to(tl.float32)
        if cls == 0:  # whole tile outside every row's window
            l_out = l_out + tl.reduce(p, 1, tl.standard._sum_combine)
            pv = p.to(v0.dtype)
            acc_out0 = tl.dot(pv, v0, acc_out0, input_precision=DOT_PRECISION)
            if SPLIT_D:
                acc_out1 = tl.dot(pv, v1, acc_out1, input_precision=DOT_PRECISION)
        elif cls == 2:  # whole tile inside
            l_in = l_in + tl.reduce(p, 1, tl.standard._sum_combine)
            pv = p.to(v0.dtype)
            acc_in0 = tl.dot(pv, v0, acc_in0, input_precision=DOT_PRECISION)
            if SPLIT_D:
                acc_in1 = tl.dot(pv, v1, acc_in1, input_precision=DOT_PRECISION)
        else:  # the window boundary cuts the tile: split p
            kv = offs_k - OFF
            if BAND:
                dd = qv[:, None] - kv[None, :]
                win = (dd <= RH) & (dd >= -RH)
            else:
                dr = q_r[:, None] - (kv // GW)[None, :]
                dc = q_c[:, None] - (kv % GW)[None, :]
                win = (dr <= RH) & (dr >= -RH) & (dc <= RW) & (dc >= -RW)
            if HAS_TEXT:
                win = win | q_text[:, None] | ((kv < 0) | (kv >= N_VIS))[None, :]
            p_in = tl.where(win, p, 0.0)
            p_out = p - p_in
            l_in = l_in + tl.reduce(p_in, 1, tl.standard._sum_combine)
            l_out = l_out + tl.reduce(p_out, 1, tl.standard._sum_combine)
            pin = p_in.to(v0.dtype)
            pout = p_out.to(v0.dtype)
            acc_in0 = tl.dot(pin, v0, acc_in0, input_precision=DOT_PRECISION)
            acc_out0 = tl.dot(pout, v0, acc_out0, input_precision=DOT_PRECISION)
            if SPLIT_D:
                acc_in1 = tl.dot(pin, v1, acc_in1, input_precision=DOT_PRECISION)
                acc_out1 = tl.dot(pout, v1, acc_out1, input_precision=DOT_PRECISION)

    l_full = l_in + l_out  # >= 1: the row max contributes exp2(0)
    inv_full = 1.0 / tl.where(l_full == 0.0, 1.0, l_full)
    inv_win = 1.0 / tl.where(l_in == 0.0, 1.0, l_in)  # guard: window mass underflowed
    f_base = OutF + off_b * stride_fb + off_h * stride_fh + offs_m.to(tl.int64)[:, None] * stride_fm
    w_base = OutW + off_b * stride_wb + off_h * stride_wh + offs_m.to(tl.int64)[:, None] * stride_wm
    st0 = m_ok[:, None] & d0_ok[None, :]
    tl.store(f_base + offs_d0[None, :] * stride_fd,
             ((acc_in0 + acc_out0) * inv_full[:, None]).to(OutF.dtype.element_ty), mask=st0)
    tl.store(w_base + offs_d0[None, :] * stride_wd, (acc_in0 * inv_win[:, None]).to(OutW.dtype.element_ty), mask=st0)
    if SPLIT_D:
        st1 = m_ok[:, None] & d1_ok[None, :]
        tl.store(f_base + offs_d1[None, :] * stride_fd,
                 ((acc_in1 + acc_out1) * inv_full[:, None]).to(OutF.dtype.element_ty), mask=st1)
        tl.store(w_base + offs_d1[None, :] * stride_wd,
                 (acc_in1 * inv_win[:, None]).to(OutW.dtype.element_ty), mask=st1)


def _prune_configs(configs, named_args, **kwargs):
    """Drop pipeline depths whose K/V tiles would not fit shared memory."""
    width = kwargs["BLOCK_D0"] + (kwargs["BLOCK_D1"] if kwargs["SPLIT_D"] else 0)
    tile = 2 * kwargs["BLOCK"] * width * named_args["Q"].element_size()
    fit = [c for c in configs if tile * max(1, c.num_stages) <= 192 * 1024]
    return fit or [triton.Config({}, num_warps=8, num_stages=1)]


#: autotuned (num_warps, num_stages) candidates on the GPU
_CONFIGS = [(w, s) for w in (4, 8) for s in (2, 3)]


@functools.lru_cache(maxsize=4)
def _triton_kernel(interpret: bool, configs: tuple | None = None):
    """Autotuned over num_warps / num_stages on the GPU, plain under the interpreter."""
    kernel = triton.jit(_fw_fwd_kernel)
    if interpret:
        return kernel
    cfgs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in (configs or _CONFIGS)]
    return triton.autotune(
        cfgs,
        key=["L", "BLOCK", "HEAD_DIM", "BAND", "HAS_TEXT", "EVEN_L", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(kernel)


def _split_head_dim(d: int) -> tuple[int, int, bool]:
    """(BLOCK_D0, BLOCK_D1, SPLIT_D): a power of two, plus a small power-of-two tail if needed."""
    p = pad_head_dim(d)
    if p == d or d <= 16:
        return p, 16, False
    d0 = p // 2
    d1 = pad_head_dim(d - d0)
    if d0 + d1 >= p:  # the tail is as wide as the head: no gain from splitting
        return p, 16, False
    return d0, d1, True


def _triton_full_and_window(q, k, v, spec, scale, block_size, configs=None):
    if triton is None:
        raise ValueError("backend 'triton' needs the triton package")
    interpret = triton_interpreting()
    if not (q.is_cuda or interpret):
        raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"backend 'triton' supports q dtypes {_TRITON_DTYPES}, got {q.dtype}")
    B, H, L, D = q.shape
    if block_size is None:
        block_size = 128 if q.is_cuda else 64
    nb = _cdiv(L, block_size)
    cls = tile_classes(spec, block_size, q.device)
    out_f = torch.empty_like(q)
    out_w = torch.empty_like(q)
    d0, d1, split = _split_head_dim(D)
    rh, rw = spec.radius
    _triton_kernel(interpret, configs)[(nb, B * H)](
        q, k, v, out_f, out_w, cls,
        scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out_f.stride(), *out_w.stride(),
        H, L, nb,
        spec.num_visual, spec.visual_offset, spec.grid[1], rh, rw,
        BLOCK=block_size, HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, SPLIT_D=split,
        BAND=spec.kind == "band1d", HAS_TEXT=spec.text_tokens > 0, EVEN_L=L % block_size == 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_BF16=interpret and q.dtype == torch.bfloat16,
    )
    return out_f, out_w


# --------------------------------------------------------------------------- public


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
    """``(out_full, out_window)``, both ``(B, H, L, D)`` in ``q.dtype``, in one pass over K/V.

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
        backend = "triton" if triton is not None and (q.is_cuda or triton_interpreting()) else "reference"
    if backend == "triton":
        return _triton_full_and_window(q, k, v, spec, scale, block_size)
    return full_and_window_attention_reference(q, k, v, spec, scale=scale)
