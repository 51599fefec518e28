"""Block attention mass from a cached log-sum-exp (AdaSpa's search statistic).

AdaSpa searches, per (batch, head), which key blocks each query block keeps. Its
statistic is the *block attention mass*

    W[b, h, p, c] = sum_{i in query block p, j in key block c} softmax(q k^T * scale)[i, j]
                  = sum_{i, j} exp(q_i . k_j * scale - LSE_i),

with ``LSE_i`` the natural-log log-sum-exp of row ``i`` of the *full* attention
(the paper's pseudo-code writes ``log(qk - LSE)``: a typo, it is
``exp(qk * scale - LSE)``). The LSE barely moves between denoising steps, so it is
computed once by a full attention pass that also returns it
(:func:`attention_with_lse`) and cached; later searches get ``W`` in one pass from
the cached LSE (:func:`block_mass`) without materialising the ``L x L`` matrix.

Layout everywhere is SDPA's: ``q, k, v`` of shape ``(B, H, L, D)``, self-attention
only (k/v have the same shape as q). ``lse`` is ``(B, H, L)`` float32, natural log.
``key_padding_mask`` is a bool ``(B, L)``, True = key kept. ``W`` is float32
``(B, H, NB, NB)`` with ``NB = ceil(L / block_size)``; the last block is ragged
(tokens ``>= L`` contribute nothing), masked keys contribute nothing, and rows whose
``lse`` is ``-inf`` (a query with no kept key) contribute nothing.

Invariant: with the fresh LSE of the same ``q, k`` and mask, every row of ``W``
sums over key blocks to the number of queries in block ``p`` that see at least
one key (``block_size``, less in the ragged last block) up to rounding; with a
stale (cached) LSE the row sums drift from it by how much the LSE moved.

The Triton kernel is one variant, exact to float32 rounding (float32 exp2, sums over
each key block first): the fastest on the H100. ``scripts/tune_block_mass.py`` keeps
the others (fp16 and polynomial exps, tensor-core sums) and times them.
"""

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from ._common import check_qkv, compiled_flex_attention, split_head_dim, triton_interpreting

try:  # optional: only the "triton" block_mass backend needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None

__all__ = [
    "attention_with_lse",
    "attention_with_lse_reference",
    "block_mass",
    "block_mass_reference",
]

_ATTN_BACKENDS = ("auto", "cudnn", "flash", "efficient", "flex", "reference")
_MASS_BACKENDS = ("auto", "triton", "reference")
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2
# Reference paths hold at most about this many float scores at a time (B*H*chunk*L).
_CHUNK_ELEMENTS = 1 << 24
#: block sizes every backend of ``block_mass`` accepts (the Triton kernel's tiles hold whole blocks)
BLOCK_SIZES = (16, 32, 64, 128)


# --------------------------------------------------------------------------- validation




def _check_lse(lse, q) -> None:
    B, H, L, _ = q.shape
    if not isinstance(lse, torch.Tensor):
        raise ValueError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if not lse.is_floating_point():
        raise ValueError(f"lse must be a floating-point tensor, got {lse.dtype}")
    if tuple(lse.shape) != (B, H, L):
        raise ValueError(f"lse must have shape (B, H, L) = {(B, H, L)}, got {tuple(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse must be on the same device as q ({q.device}), got {lse.device}")


def _check_block_size(block_size) -> int:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size not in BLOCK_SIZES
    ):
        raise ValueError(f"block_size must be a power of two in [16, 128] (16, 32, 64 or 128), got {block_size!r}")
    return block_size


def _check_chunk(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _compute_dtype(q) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _chunk_rows(q, chunk_size) -> int:
    B, H, L, _ = q.shape
    return chunk_size or max(1, _CHUNK_ELEMENTS // max(1, B * H * L))


# --------------------------------------------------------------------------- attention + LSE: reference


def attention_with_lse_reference(q, k, v, *, scale=None, key_padding_mask=None, chunk_size=None):
    """Exact dense attention and its row log-sum-exp, chunked over queries.

    Computed in float32 (float64 for float64 inputs), ``chunk_size`` query rows at a
    time (default: about ``2**24 / (B * H * L)`` rows), so no more than
    ``B * H * chunk * L`` scores exist at once. Returns ``(out, lse)``: ``out`` in
    ``q.dtype`` ``(B, H, L, D)``, ``lse`` float32 ``(B, H, L)``, natural log. A query
    with no kept key (its batch entry is fully masked) gets ``out = 0``,
    ``lse = -inf``.
    """
    scale = check_qkv((("q", q), ("k", k), ("v", v)), key_padding_mask, scale)
    _check_chunk(chunk_size)
    B, H, L, D = q.shape
    cdt = _compute_dtype(q)
    kt = k.to(cdt).transpose(-1, -2)
    vc = v.to(cdt)
    drop = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    step = _chunk_rows(q, chunk_size)
    for qs in range(0, L, step):
        qe = min(L, qs + step)
        s = torch.matmul(q[:, :, qs:qe].to(cdt), kt) * scale
        if drop is not None:
            s = s.masked_fill(drop, float("-inf"))
        m = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isneginf(m), 0.0, m)[..., None])  # -inf rows: exp(-inf) = 0
        out[:, :, qs:qe] = torch.matmul(p, vc).to(q.dtype)
        lse[:, :, qs:qe] = m.float()
    return out, lse


# --------------------------------------------------------------------------- attention + LSE: fast paths (CUDA)


class _Unsupported(RuntimeError):
    """A backend cannot take these inputs (dtype, mask, head dim, ...)."""


# (backend, device type, masked) -> multiplier turning the backend's LSE into natural log
# (1.0 natural, ln 2 base-2), or None once its LSE matched neither convention.
_LSE_FACTOR: dict[tuple[str, str, bool], float | None] = {}


def _float_bias(mask, q) -> torch.Tensor:
    """Additive bias (B, H, L, L) (expanded view, no copy) from a keep-mask (B, L).

    The row is allocated with its last dim padded to a multiple of 16, as the fused
    kernels want aligned bias strides.
    """
    B, H, L, _ = q.shape
    pad = -(-L // 16) * 16
    bias = torch.zeros(B, 1, 1, pad, dtype=q.dtype, device=q.device)
    bias[..., :L].masked_fill_(~mask[:, None, None, :], float("-inf"))
    return bias[..., :L].expand(B, H, L, L)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _flex_lse(q, k, v, scale, mask):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, L, _ = q.shape
    block_mask = None
    if mask is not None:

        def mask_mod(b, h, q_idx, kv_idx):
            return mask[b, kv_idx]

        block_mask = create_block_mask(mask_mod, B, None, L, L, device=q.device)
    fn = compiled_flex_attention() if q.is_cuda else flex_attention
    with warnings.catch_warnings():  # eager flex warns it is unfused off CUDA: expected
        warnings.simplefilter("ignore", UserWarning)
        try:
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:  # older torch: return_lse
            return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse


def _raw_lse(q, k, v, scale, mask, backend):
    """(out, raw lse) from one fused backend; raises when it cannot take the inputs."""
    if backend == "flex":
        return _flex_lse(q, k, v, scale, mask)
    if not q.is_cuda:
        if backend != "flash":
            raise _Unsupported(f"backend {backend!r} needs CUDA tensors")
        # PyTorch's CPU flash kernel (the one SDPA runs on the CPU) also returns the LSE; it takes
        # the key padding mask as an additive bias
        bias = None if mask is None else _float_bias(mask, q)
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                          scale=scale)
        return res[0], res[1]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    bias = None if mask is None else _float_bias(mask, q)
    if backend == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, bias, True, dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=scale
        )
    elif backend == "flash":
        if mask is not None:
            raise _Unsupported("flash attention takes no key padding mask")
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=scale
        )
    elif backend == "efficient":
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, dropout_p=0.0, is_causal=False, scale=scale
        )
    else:  # pragma: no cover - guarded by validation
        raise ValueError(f"unknown backend {backend!r}")
    return res[0], res[1]


def _shape_lse(raw, q) -> torch.Tensor:
    """Bring a backend LSE to (B, H, L): drop a trailing 1 (cuDNN), cut padding (efficient)."""
    B, H, L, _ = q.shape
    if raw.dim() == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.dim() != 3 or tuple(raw.shape[:2]) != (B, H) or raw.shape[2] < L:
        raise _Unsupported(f"unexpected LSE shape {tuple(raw.shape)} for q {tuple(q.shape)}")
    return raw[..., :L].float()


def _sample_lse(q, k, scale, mask) -> tuple[torch.Tensor, tuple]:
    """Reference natural-log LSE for a few rows of the first and last (batch, head)."""
    B, H, L, _ = q.shape
    rows = torch.linspace(0, L - 1, min(L, 16), device=q.device).round().long().unique()
    refs, idx = [], []
    for b, h in {(0, 0), (B - 1, H - 1)}:
        s = torch.matmul(q[b, h, rows].float(), k[b, h].float().T) * scale
        if mask is not None:
            s = s.masked_fill(~mask[b][None, :], float("-inf"))
        refs.append(torch.logsumexp(s, -1))
        idx.append((b, h))
    return torch.stack(refs), (idx, rows)


def _lse_factor(lse, q, k, scale, mask) -> float | None:
    """1.0 if ``lse`` is natural log, ln 2 if base 2, None if neither (checked on sample rows)."""
    ref, (idx, rows) = _sample_lse(q, k, scale, mask)
    got = torch.stack([lse[b, h, rows] for b, h in idx])
    ok = torch.isfinite(ref)
    if not bool(ok.any()):
        return None
    ref, got = ref[ok].double(), got[ok].double()
    tol = 2e-2 + 2e-3 * ref.abs()
    for factor in (1.0, _LN2):
        if bool(((got * factor - ref).abs() <= tol).all()):
            return factor
    return None


def _fused_attention_with_lse(q, k, v, scale, mask, backend):
    key = (backend, q.device.type, mask is not None)
    if key in _LSE_FACTOR and _LSE_FACTOR[key] is None:
        raise _Unsupported(f"backend {backend!r} returned an LSE in no known convention")
    out, raw = _raw_lse(q, k, v, scale, mask, backend)
    lse = _shape_lse(raw, q)
    if key not in _LSE_FACTOR:  # first use: learn (and check) the LSE convention numerically
        _LSE_FACTOR[key] = _lse_factor(lse, q, k, scale, mask)
        if _LSE_FACTOR[key] is None:
            raise _Unsupported(f"backend {backend!r} returned an LSE in no known convention")
    factor = _LSE_FACTOR[key]
    if factor != 1.0:
        lse = lse * factor
    out = out.to(q.dtype)
    if mask is not None:  # fully masked batch entries: out 0, lse -inf (fused kernels may give NaN)
        dead = ~mask.any(-1)
        if bool(dead.any()):
            out = out.masked_fill(dead[:, None, None, None], 0.0)
            lse = lse.masked_fill(dead[:, None, None], float("-inf"))
    return out, lse


def attention_with_lse(q, k, v, *, scale=None, key_padding_mask=None, backend="auto"):
    """Exact dense attention plus the row log-sum-exp, ``(B, H, L, D)`` layout.

    Args:
        q, k, v: same shape, dtype and device.
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_padding_mask: optional bool ``(B, L)``, True = key kept.
        backend: ``"auto"`` (CUDA: ``"cudnn"``, then ``"flash"`` (no mask), then
            ``"efficient"``, then ``"reference"``, taking the first that accepts the
            inputs; CPU: ``"flash"``, then ``"reference"``; elsewhere ``"reference"``),
            ``"cudnn"``, ``"flash"`` (on the CPU: PyTorch's CPU flash kernel, which takes a
            key padding mask), ``"efficient"`` (the fused SDPA kernels through
            ``torch.ops.aten``; a key padding mask becomes an additive ``-inf`` bias), ``"flex"``
            (``flex_attention`` returning its LSE; compiled on CUDA, eager elsewhere)
            or ``"reference"`` (:func:`attention_with_lse_reference`).

    Returns:
        ``(out, lse)``: ``out`` ``(B, H, L, D)`` in ``q.dtype``; ``lse`` float32
        ``(B, H, L)``, natural log, whatever the backend's own convention (cuDNN's is
        learnt once per backend by comparing a few rows with the reference, and
        converted). Queries of a fully masked batch entry get ``out = 0``,
        ``lse = -inf``.
    """
    scale = check_qkv((("q", q), ("k", k), ("v", v)), key_padding_mask, scale)
    if backend not in _ATTN_BACKENDS:
        raise ValueError(f"backend must be one of {_ATTN_BACKENDS}, got {backend!r}")
    mask = key_padding_mask
    if backend == "reference":
        return attention_with_lse_reference(q, k, v, scale=scale, key_padding_mask=mask)
    if backend != "auto":
        return _fused_attention_with_lse(q, k, v, scale, mask, backend)
    if q.is_cuda:  # CUDA's flash kernel takes no key padding mask
        names = ("cudnn", "efficient") if mask is not None else ("cudnn", "flash", "efficient")
    else:
        names = ("flash",) if q.device.type == "cpu" else ()
    for name in names:
        try:
            return _fused_attention_with_lse(q, k, v, scale, mask, name)
        except Exception:  # not supported for these inputs: try the next kernel
            continue
    return attention_with_lse_reference(q, k, v, scale=scale, key_padding_mask=mask)


# --------------------------------------------------------------------------- block mass: reference


def block_mass_reference(q, k, lse, *, block_size=64, scale=None, key_padding_mask=None, chunk_size=None):
    """Chunked PyTorch block mass: ``W[b, h, p, c] = sum exp(q_i . k_j * scale - lse_i)``.

    Loops over chunks of whole query blocks (about ``chunk_size`` rows, default about
    ``2**24 / (B * H * L)``): scores of the chunk against all keys in float32
    (float64 for float64 inputs), ``exp(s - lse)``, masked keys zeroed, then summed
    into ``block_size x block_size`` tiles by reshape. Memory ``O(B * H * chunk * L)``.
    Returns float32 ``(B, H, NB, NB)``, ``NB = ceil(L / block_size)``.
    """
    scale = check_qkv((("q", q), ("k", k)), key_padding_mask, scale)
    _check_lse(lse, q)
    bs = _check_block_size(block_size)
    _check_chunk(chunk_size)
    B, H, L, D = q.shape
    nb = -(-L // bs)
    cdt = _compute_dtype(q)
    kt = k.to(cdt).transpose(-1, -2)
    # A row with lse = -inf (no kept key) contributes nothing: exp(s - inf) = 0.
    lse_c = lse.to(cdt)
    lse_c = torch.where(torch.isneginf(lse_c), float("inf"), lse_c)
    drop = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    W = torch.empty(B, H, nb, nb, dtype=torch.float32, device=q.device)
    blocks = max(1, _chunk_rows(q, chunk_size) // bs)
    for p0 in range(0, nb, blocks):
        p1 = min(nb, p0 + blocks)
        qs, qe = p0 * bs, min(L, p1 * bs)
        p = torch.matmul(q[:, :, qs:qe].to(cdt), kt).mul_(scale).sub_(lse_c[:, :, qs:qe, None]).exp_()
        if drop is not None:
            p = p.masked_fill(drop, 0.0)
        p = F.pad(p, (0, nb * bs - L, 0, (p1 - p0) * bs - (qe - qs)))  # ragged blocks: zero rows/cols
        W[:, :, p0:p1] = p.view(B, H, p1 - p0, bs, nb, bs).sum(dim=(3, 5)).float()
    return W


# --------------------------------------------------------------------------- block mass: Triton

# Defined only where triton imports (the annotations need tl). No
# `from __future__ import annotations` in this module: triton's interpreter
# recognises constexpr parameters only from real annotations.
if triton is not None:
    # Sums are tl.reduce with triton's own add combiner rather than tl.sum: tl.sum is a
    # jitted library function, compiled-mode only if triton was imported before
    # TRITON_INTERPRET was set (as under pytest, where conftest imports it first),
    # while the interpreter recognises this combiner by identity and uses numpy.
    _sum_combine = tl.standard._sum_combine

    def _block_mass_kernel(
        Q, K, LSE, MASK, W,
        s_qb, s_qh, s_ql, s_qd,
        s_kb, s_kh, s_kl, s_kd,
        s_lb, s_lh, s_ll,
        s_mb, s_ml,
        H, L, D, NB, N_START, N_END,
        qk_scale2,
        BS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D0: tl.constexpr,
        BLOCK_D1: tl.constexpr,
        SPLIT_D: tl.constexpr,
        FULL_K: tl.constexpr,
        HAS_MASK: tl.constexpr,
        EVEN_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        # One program per (tile of BLOCK_M queries = QB query blocks, b * H + h); it loops over
        # the keys N_START <= j < N_END in tiles of BLOCK_N (= KB key blocks) and stores a QB x KB
        # tile of W for each.
        # The head dim is BLOCK_D0 columns, plus BLOCK_D1 more when SPLIT_D (72 = 64 + 16).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        QB: tl.constexpr = BLOCK_M // BS
        KB: tl.constexpr = BLOCK_N // BS
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d0 = tl.arange(0, BLOCK_D0)
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        row_ok = offs_m < L
        d0_ok = offs_d0 < D
        d1_ok = offs_d1 < D
        q_rows = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql
        q0 = tl.load(q_rows + offs_d0[None, :] * s_qd, mask=row_ok[:, None] & d0_ok[None, :], other=0.0)
        if UPCAST:  # interpreter: its dot mis-reads bfloat16 (stored as uint16)
            q0 = q0.to(tl.float32)
        if SPLIT_D:
            q1 = tl.load(q_rows + offs_d1[None, :] * s_qd, mask=row_ok[:, None] & d1_ok[None, :], other=0.0)
            if UPCAST:
                q1 = q1.to(tl.float32)
        lse = tl.load(LSE + b * s_lb + h * s_lh + offs_m * s_ll, mask=row_ok, other=float("-inf")).to(tl.float32)
        # exp(s * scale - lse) = exp2(s * qk_scale2 - lse2), lse2 = lse * log2e; rows past L or
        # with lse = -inf get +inf: they contribute exp2(-inf) = 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        # The W tile's rows and columns: rows past NB and columns past NB are not stored.
        w_r = tl.arange(0, QB)
        w_c = tl.arange(0, KB)
        w_rows = pid_m * QB + w_r
        w_row_ok = w_rows < NB
        w_base = W + pid_bh.to(tl.int64) * NB * NB + w_rows[:, None] * NB
        k_base = K + b * s_kb + h * s_kh
        for start_n in range(N_START, N_END, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < L
            k_cols = k_base + offs_n[None, :] * s_kl
            if FULL_K:  # no ragged key tile, no head-dim padding: unmasked loads
                k0 = tl.load(k_cols + offs_d0[:, None] * s_kd)
            else:
                k0 = tl.load(k_cols + offs_d0[:, None] * s_kd, mask=d0_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                k0 = k0.to(tl.float32)
            s = tl.dot(q0, k0, input_precision=DOT_PRECISION)
            if SPLIT_D:
                k1 = tl.load(k_cols + offs_d1[:, None] * s_kd, mask=d1_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:
                    k1 = k1.to(tl.float32)
                s = tl.dot(q1, k1, s, input_precision=DOT_PRECISION)
            x = s * qk_scale2 - lse2[:, None]
            if HAS_MASK:  # masked keys and keys past L (loaded as 0) get exp2(-inf) = 0
                keep = tl.load(MASK + b * s_mb + offs_n * s_ml, mask=col_ok, other=0)
                x = tl.where((keep != 0)[None, :], x, float("-inf"))
            elif not EVEN_N:
                x = tl.where(col_ok[None, :], x, float("-inf"))
            p = tl.math.exp2(x)
            # float32 sums: over each key block of a row first, then over each query block's rows
            if KB == 1:
                row = tl.reduce(p, 1, _sum_combine)[:, None]
            else:
                row = tl.reduce(tl.reshape(p, (BLOCK_M, KB, BS)), 2, _sum_combine)
            if QB == 1:
                w = tl.reduce(row, 0, _sum_combine)[None, :]
            else:
                w = tl.reduce(tl.reshape(row, (QB, BS, KB)), 1, _sum_combine)
            w_cols = start_n // BS + w_c
            w_col_ok = w_cols < NB
            tl.store(w_base + w_cols[None, :], w, mask=w_row_ok[:, None] & w_col_ok[None, :])


@functools.lru_cache(maxsize=2)
def _jit_kernel(interpret: bool):
    # Jitted lazily: triton picks interpreter vs compiler at decoration time, so the
    # kernel follows TRITON_INTERPRET as it is when first used, not at import.
    return triton.jit(_block_mass_kernel)


def _default_config(bs: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    From ``scripts/tune_block_mass.py`` on an H100 (bf16, block 64, 2026-11-24, two runs): at 1 x
    24 x 115200 x 128, 256 x 64 tiles, 8 warps, 3 stages took 149.3 / 151.9 ms, 0.59x dense SDPA
    timed in the same run (254 / 257 ms; 275 ms on earlier machines), against 173 ms with 2
    stages, 213 ms with 4, 162 ms with 4 warps and 182 / 186 / 237 ms for 128 x 128 (2 stages) /
    128 x 64 (3) / 256 x 128 (2); at 2 x 16 x 16384 x 72, 4.6 ms (0.69x dense's 6.6-6.8 ms), the
    same with 2 to 4 stages. The kernel alternates matrix products and exp2 within a program, so
    it needs two programs per SM, one's products overlapping the other's exps (256 x 64, 3
    stages: 112 KB of shared memory each; 4 stages or 128-key tiles leave room for one), a third
    stage so that a key tile's load is not waited for, and 256 rows per program so that each key
    tile read from L2 serves more queries. Block size 128 and head dims over 128 keep the
    earlier 128 x 128 (x 64) tiles with 2 stages (not re-measured).

    The kernel's float32 exp2 and keys-first sums were the fastest of the variants that script
    times (f16 and polynomial exps, rows-first and tensor-core sums: 149.3 ms against 160.0 to
    415.5 ms in the same H100 run); the variants live in the script, not in the package.
    """
    if bs <= 64 and d <= 128:
        return 256, 64, 8, 3
    return 128, max(bs, 128 if d <= 128 else 64), 8, 2


def _block_mass_triton(q, k, lse, bs, scale, mask, block_m=None, block_n=None, num_warps=None, num_stages=None,
                       split_tail=True):
    """The Triton block mass; tiles default to :func:`_default_config`. Exact to float32 rounding
    (with IEEE dots for float32 inputs): 5e-6 relative on the H100 at 115,200 tokens, bf16 inputs.

    ``split_tail``: when L is not a multiple of the key tile, a first launch runs the whole key tiles
    with unmasked loads and a second the ragged last one (``False``: one launch, every load masked)."""
    if triton is None:
        raise RuntimeError("block_mass backend 'triton' needs the triton package")
    interpret = triton_interpreting()
    if not (q.is_cuda or interpret):
        raise ValueError("block_mass backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype must be float16, bfloat16 or float32 for backend 'triton', got {q.dtype}")
    B, H, L, D = q.shape
    nb = -(-L // bs)
    dm, dn, dw, ds = _default_config(bs, D)
    block_m, block_n = block_m or dm, block_n or dn
    if block_m % bs or block_n % bs:
        raise ValueError(f"block_m={block_m} and block_n={block_n} must be multiples of block_size={bs}")
    W = torch.empty(B, H, nb, nb, dtype=torch.float32, device=q.device)
    lse = lse.float()
    m = mask.to(torch.uint8) if mask is not None else torch.empty(1, 1, dtype=torch.uint8, device=q.device)
    d0, d1, split = split_head_dim(D)
    grid = (triton.cdiv(L, block_m), B * H)
    whole = L - L % block_n if split_tail else (L if L % block_n == 0 else 0)
    for n0, n1 in ((0, whole), (whole, L)):  # (keys in whole tiles, the ragged rest)
        if n0 == n1:
            continue
        even = n1 % block_n == 0
        _jit_kernel(interpret)[grid](
            q, k, lse, m, W,
            *q.stride(), *k.stride(), *lse.stride(), *m.stride(),
            H, L, D, nb, n0, n1,
            scale * _LOG2E,
            BS=bs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D0=d0, BLOCK_D1=d1, SPLIT_D=split,
            FULL_K=even and d0 <= D, HAS_MASK=mask is not None, EVEN_N=even,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST=interpret and q.dtype == torch.bfloat16,
            num_warps=num_warps or dw, num_stages=num_stages or ds,
        )  # fmt: skip
    return W


# --------------------------------------------------------------------------- block mass: public


def block_mass(q, k, lse, *, block_size=64, scale=None, key_padding_mask=None, backend="auto"):
    """Block attention mass ``W`` (float32 ``(B, H, NB, NB)``) from a cached LSE, in one pass.

    ``W[b, h, p, c] = sum_{i in block p, j in block c} exp(q_i . k_j * scale - lse_i)``;
    with the fresh LSE this is the softmax mass of tile ``(p, c)``. See the module
    docstring for ragged blocks, masked keys and ``-inf`` rows.

    Args:
        q, k: ``(B, H, L, D)``, same shape, dtype and device.
        lse: ``(B, H, L)`` natural-log LSE of the full attention (e.g. from
            :func:`attention_with_lse`, possibly from an earlier step).
        block_size: query and key block size: 16, 32, 64 or 128.
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_padding_mask: optional bool ``(B, L)``, True = key kept.
        backend: ``"auto"`` (``"triton"`` on CUDA, or on CPU when
            ``TRITON_INTERPRET=1``, else ``"reference"``; float64 always
            ``"reference"``), ``"triton"`` (one program per tile of query blocks and
            (batch, head), looping over key tiles: ``q k^T`` in the input dtype with
            float32 accumulation (IEEE for float32), ``exp2`` with a pre-scaled LSE,
            float32 sums over each key block, then over each query block's rows: exact
            to float32 rounding; any head dim, 72 as 64 + 16 columns) or
            ``"reference"`` (:func:`block_mass_reference`).
    """
    scale = check_qkv((("q", q), ("k", k)), key_padding_mask, scale)
    _check_lse(lse, q)
    bs = _check_block_size(block_size)
    if backend not in _MASS_BACKENDS:
        raise ValueError(f"backend must be one of {_MASS_BACKENDS}, got {backend!r}")
    if backend == "auto":
        fast = triton is not None and (q.is_cuda or triton_interpreting()) and q.dtype != torch.float64
        backend = "triton" if fast else "reference"
    if backend == "reference":
        return block_mass_reference(q, k, lse, block_size=bs, scale=scale, key_padding_mask=key_padding_mask)
    return _block_mass_triton(q, k, lse, bs, scale, key_padding_mask)
