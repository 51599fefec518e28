"""Kernel cases of ``ditaccel bench``: the attention kernels alone at real shapes: window
attention vs dense SDPA (``attention``), AdaSpa's search and block-sparse kernels (``adaspa``),
block-sparse speed against the kept fraction, ours vs FlexAttention vs dense (``sparsity``)."""

from __future__ import annotations

import datetime
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..kernels.block_mass import attention_with_lse, block_mass
from ..kernels.block_sparse import block_sparse_attention, block_sparse_flops, mask_to_indices
from ..kernels.window import window_attention, window_mask_mod, window_pair_fraction, window_tile_fraction
from ..kernels.window_residual import full_and_window_attention
from ..methods.adaspa import AdaSpaConfig, search_mask, select_mask, text_blocks, video_blocks
from ..methods.ditfastattn import make_window
from .harness import (
    _check_positive_ints,
    _dtype_name,
    attention_rows_reference,
    block_mass_rows_reference,
    dense_sdpa_context,
    rows_reference,
    time_fn,
)
from .report import device_name

#: kept fractions of key blocks that ``ditaccel bench sparsity`` measures by default
SPARSITY_KEPT = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)


def bench_attention(tokens: int = 16384, heads: int = 16, head_dim: int = 72, batch: int = 2,
                    device: str = "cuda", dtype=torch.bfloat16, window: str = "band1d",
                    window_size: float = 0.25, repeats: int | None = None) -> dict:
    """Dense SDPA (cuDNN priority) vs. window attention at one shape, with TFLOP/s; on CUDA also
    the experimental one-pass full + window kernel. Every kernel is checked against an exact
    reference on sampled rows, then timed by :func:`time_fn` (``repeats``: its default)."""
    _check_positive_ints(tokens=tokens, heads=heads, head_dim=head_dim, batch=batch)
    side = math.isqrt(tokens)
    spec = make_window(window, window_size, (side, tokens // side))
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    flops = 4.0 * batch * heads * tokens * tokens * head_dim
    res = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "batch": batch, "window": window,
           "tile_fraction": window_tile_fraction(spec), "pair_fraction": window_pair_fraction(spec),
           "dtype": _dtype_name(dtype), "device": device_name(device), "torch": torch.__version__,
           "date": datetime.date.today().isoformat()}
    mask_mod = window_mask_mod(spec)
    keys = torch.arange(tokens, device=device)

    dense_ref = rows_reference()
    window_ref = rows_reference(lambda b, h, rows: mask_mod(b, h, rows[:, None], keys[None]))

    with dense_sdpa_context():
        dense = time_fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v), device=device,
                        reference=dense_ref, repeats=repeats)
    res["dense_ms"] = dense.median_ms
    res["window_ms"] = time_fn(lambda q, k, v: window_attention(q, k, v, spec), (q, k, v), device=device,
                               reference=window_ref, repeats=repeats).median_ms
    if device.startswith("cuda"):
        for backend in ("flex", "triton"):  # the two window kernels side by side ("auto" is one of them)
            res[f"window_{backend}_ms"] = time_fn(lambda q, k, v: window_attention(q, k, v, spec, backend=backend),
                                                  (q, k, v), device=device, reference=window_ref,
                                                  repeats=repeats).median_ms
        res["full_plus_window_two_calls_ms"] = res["dense_ms"] + res["window_ms"]
        res["full_and_window_one_pass_ms"] = time_fn(  # the experimental one-pass kernel (autotunes at first call)
            lambda q, k, v: full_and_window_attention(q, k, v, spec), (q, k, v), device=device,
            reference=lambda rows, q, k, v: (dense_ref(rows, q, k, v), window_ref(rows, q, k, v)),
            repeats=repeats).median_ms
    res["dense_tflops"] = flops / res["dense_ms"] / 1e9
    res["window_effective_tflops"] = flops * res["tile_fraction"] / res["window_ms"] / 1e9
    res["speedup"] = res["dense_ms"] / res["window_ms"]
    res["timing"] = dense.summary()
    return res


def structured_qkv(frames: int, rows: int, cols: int, heads: int, head_dim: int, device: str, dtype,
                   text_tokens: int = 0, seed: int = 0):
    """q, k, v (1, H, L, D) whose attention has video-like structure: each head attends to
    space-time neighbours at its own scale (Fourier features of (t, y, x) positions; small scales
    = local heads, large = near-global), plus a little noise. L = frames·rows·cols + text."""
    g = torch.Generator(device=device).manual_seed(seed)
    t, y, x = torch.meshgrid(torch.arange(frames, device=device), torch.arange(rows, device=device),
                             torch.arange(cols, device=device), indexing="ij")
    pos = torch.stack([t.flatten() * 4.0, y.flatten().float(), x.flatten().float()], dim=1)  # (N, 3)
    n_freq = head_dim // 6
    qs, ks = [], []
    for h in range(heads):
        scale = 2.0 ** (-(h % 6))  # local ... global
        freqs = torch.randn(3, n_freq, device=device, generator=g) * scale
        ang = pos @ freqs
        feat = torch.cat([ang.sin(), ang.cos()], dim=1).repeat(1, 3)[:, :head_dim]
        feat = torch.nn.functional.pad(feat, (0, head_dim - feat.shape[1]))
        sharp = 6.0 / head_dim**0.5
        qs.append(feat * sharp * head_dim**0.5)
        ks.append(feat)
    q, k = torch.stack(qs)[None], torch.stack(ks)[None]
    if text_tokens:
        q = torch.cat([q, torch.randn(1, heads, text_tokens, head_dim, device=device, generator=g)], dim=2)
        k = torch.cat([k, torch.randn(1, heads, text_tokens, head_dim, device=device, generator=g)], dim=2)
    q = q + 0.1 * torch.randn(q.shape, device=device, generator=g)
    v = torch.randn(q.shape, device=device, generator=g)
    return q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()


def _block_allowed(block_mask: torch.Tensor, block_size: int, tokens: int) -> Callable:
    """``allowed(b, h, rows)`` for :func:`attention_rows_reference` from a ``(B, H, NQ, NK)`` block mask."""
    key_block = torch.arange(tokens, device=block_mask.device) // block_size

    def allowed(b, h, rows):
        return block_mask[b, h][rows // block_size][:, key_block]

    return allowed


def _block_sparse_call(attention, idx, cnt, block_size: int, backend: str) -> Callable:
    """``call(q, k, v)``: ``block_sparse_attention`` with a fixed selection and backend, without the
    data-dependent index checks (as the AdaSpa method calls it: the indices come from
    ``mask_to_indices``)."""
    def call(q, k, v):
        return attention(q, k, v, idx, cnt, block_size=block_size, backend=backend, validate=False)

    return call


def bench_adaspa(frames: int = 32, rows: int = 45, cols: int = 80, heads: int = 24, head_dim: int = 128,
                 text_tokens: int = 0, sparsities=(0.8, 0.9), block_size: int = 64, device: str = "cuda",
                 dtype=torch.bfloat16, repeats: int | None = None) -> dict:
    """AdaSpa's kernels at a real shape (default ≈ HunyuanVideo 720p: 32·45·80 + 0 = 115,200
    video tokens): search with fresh LSE (full attention + LSE, block mass), search with the
    cached LSE (block mass only), and block-sparse attention, each next to dense SDPA. Kernels
    are checked against exact references on sampled query blocks, then timed by :func:`time_fn`
    (the block-sparse call as the AdaSpa method makes it: ``validate=False``)."""
    q, k, v = structured_qkv(frames, rows, cols, heads, head_dim, device, dtype, text_tokens)
    L = q.shape[2]
    dense_flops = 4.0 * heads * L * L * head_dim

    def timed(fn, inputs, reference=None, **kw):
        return time_fn(fn, inputs, device=device, reference=reference, repeats=repeats, **kw).median_ms

    res = {"tokens": L, "heads": heads, "head_dim": head_dim, "block_size": block_size, "text_tokens": text_tokens,
           "dtype": _dtype_name(dtype), "date": datetime.date.today().isoformat(),
           "device": device_name(device), "torch": torch.__version__}
    with dense_sdpa_context():
        dense = time_fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v), device=device,
                        reference=rows_reference(), check_group=block_size, repeats=repeats)
    res["dense_ms"] = dense.median_ms
    res["attention_with_lse_ms"] = timed(
        lambda q, k, v: attention_with_lse(q, k, v), (q, k, v),
        lambda rows, q, k, v: attention_rows_reference(q, k, v, rows, return_lse=True), check_group=block_size)
    _, lse = attention_with_lse(q, k, v)
    res["block_mass_ms"] = timed(
        lambda q, k, lse: block_mass(q, k, lse, block_size=block_size), (q, k, lse),
        lambda blocks, q, k, lse: block_mass_rows_reference(q, k, lse, blocks, block_size=block_size),
        check_rows=4)  # W's rows are query blocks: check 4 of them
    W = block_mass(q, k, lse, block_size=block_size)
    always = text_blocks(L, block_size, text_tokens, "suffix", q.device) if text_tokens else None
    res["select_dense_ms"] = timed(lambda W: select_mask(W, AdaSpaConfig(block_size=block_size), always), (W,))
    # the selection as the method runs it (search_mask: a few heads' W at a time, per-head sorts, packed
    # bits), W precomputed so that only the selection is timed
    nb = W.shape[-1]
    video = video_blocks(L, block_size, text_tokens, "suffix") if text_tokens else (0, nb)
    cfg = AdaSpaConfig(block_size=block_size)
    res["select_ms"] = timed(lambda W: search_mask(lambda h0, h1: W[:, h0:h1], (1, heads, nb), cfg, video,
                                                   seq_len=L, head_dim=head_dim), (W,))
    res["search_first_ms"] = res["attention_with_lse_ms"] + res["block_mass_ms"] + res["select_ms"]
    res["search_cached_ms"] = res["block_mass_ms"] + res["select_ms"]
    # first_lse="previous": the step before keeps attention_with_lse's LSE (its extra cost over
    # dense: lse_over_dense); the first search step then costs search_cached + its sparse call
    res["lse_over_dense"] = res["attention_with_lse_ms"] / res["dense_ms"]
    res["sparse"] = []
    for s in sparsities:
        mask, _, rec = select_mask(W, AdaSpaConfig(sparsity=s, block_size=block_size), always)
        idx, cnt = mask_to_indices(mask)
        ms = timed(_block_sparse_call(block_sparse_attention, idx, cnt, block_size, "auto"), (q, k, v),
                   rows_reference(_block_allowed(mask, block_size, L)), check_group=block_size)
        flops = block_sparse_flops(cnt, block_size, L, head_dim)
        res["sparse"].append({"sparsity": s, "density": float(mask.float().mean()), "recall": float(rec.mean()),
                              "ms": ms, "speedup": res["dense_ms"] / ms, "effective_tflops": flops / ms / 1e9,
                              "search_previous_ms": res["search_cached_ms"] + ms})
    res["dense_tflops"] = dense_flops / res["dense_ms"] / 1e9
    res["timing"] = dense.summary()
    return res


def random_block_mask(batch: int, heads: int, blocks: int, kept: float, *, device="cpu",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """A random bool block mask ``(batch, heads, blocks, blocks)``: every query-block row keeps
    ``max(1, round(kept * blocks))`` key blocks, always its diagonal block and the others drawn
    uniformly without replacement, independently per (batch, head, row), so the kept fraction is
    ``kept`` up to rounding and every head has its own pattern (as AdaSpa's masks do)."""
    _check_positive_ints(batch=batch, heads=heads, blocks=blocks)
    if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not 0 < kept <= 1:
        raise ValueError(f"kept must be a fraction in (0, 1], got {kept!r}")
    count = max(1, round(kept * blocks))
    scores = torch.rand(batch, heads, blocks, blocks, device=device, generator=generator)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)  # above every random score: always chosen
    top = scores.topk(count, dim=-1).indices
    return torch.zeros(batch, heads, blocks, blocks, dtype=torch.bool, device=device).scatter_(-1, top, True)


def _flex_by_hand(mask: torch.Tensor, block_size: int, tokens: int, compiled: bool) -> Callable:
    """``call(q, k, v)``: FlexAttention as a user writes it for a fixed block mask ``(B, H, NB, NB)``:
    the ``BlockMask`` built once here (outside any timed region) with PyTorch's public API, every
    kept block a full block (no ``mask_mod`` call inside it) but the ragged key tail, and
    ``flex_attention`` compiled (on CUDA; tiles of ``block_size`` where it is below flex's native
    128). Off CUDA flex runs eagerly, which evaluates ``mask_mod`` densely, so the block
    selection goes into ``mask_mod`` there."""
    idx, cnt = mask_to_indices(mask)
    idx = idx.clamp_min(0)
    if not compiled or tokens % block_size:
        def mask_mod(b, h, q_idx, kv_idx):
            keep = kv_idx < tokens
            return keep if compiled else keep & mask[b, h, q_idx // block_size, kv_idx // block_size]

        bm = BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(tokens, tokens))
    else:
        bm = BlockMask.from_kv_blocks(torch.zeros_like(cnt), idx, full_kv_num_blocks=cnt, full_kv_indices=idx,
                                      BLOCK_SIZE=block_size, seq_lengths=(tokens, tokens))
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    kw = {"kernel_options": {"BLOCK_M": block_size, "BLOCK_N": block_size}} if compiled and block_size < 128 else {}

    def call(q, k, v):
        return fn(q, k, v, block_mask=bm, **kw)

    return call


def bench_sparsity(tokens: int = 118_784, heads: int = 24, head_dim: int = 128, batch: int = 1, block_size: int = 64,
                   kept=SPARSITY_KEPT, device: str = "cuda", dtype=torch.bfloat16, repeats: int | None = None,
                   ours_backend: str = "triton", seed: int = 0, native_block: int | None = 128) -> dict:
    """Block-sparse attention speed-up over dense SDPA vs. the kept fraction of key blocks.

    One shape (default ≈ HunyuanVideo 720p: 1 × 24 heads × 118,784 tokens × 128, bf16, block 64),
    random q/k/v; per kept fraction a :func:`random_block_mask` (per head, diagonal kept), run by
    ``block_sparse_attention`` with ``backend=ours_backend`` ("triton"; CPU runs and dry runs pass
    "auto": the gather backend, or the interpreted Triton kernel under ``TRITON_INTERPRET=1``) and with
    ``backend="flex"`` (FlexAttention, compiled on CUDA, eager elsewhere; its time includes building
    the ``BlockMask`` from the indices, which that backend does on every call), both with
    ``validate=False`` as the AdaSpa method calls them; dense SDPA (cuDNN first) in the same run.
    FlexAttention also runs as a user would write it by hand (:func:`_flex_by_hand`: its
    ``BlockMask`` built once, outside the timed region): ``flex_prebuilt_ms``. With
    ``native_block`` (default 128, FlexAttention's native tile; ``None``: skip) each kept fraction
    is measured again with a random mask of ``native_block``-token blocks, ours and the prebuilt
    FlexAttention side by side (``ours_native_ms``, ``flex_native_ms``).
    Every kernel is checked against an exact reference on sampled query blocks before it is timed
    (:func:`time_fn`). Speed-ups are dense time / sparse time; the ideal is ``1 / kept``.
    """
    _check_positive_ints(tokens=tokens, heads=heads, head_dim=head_dim, batch=batch, block_size=block_size)
    kept = tuple(kept)
    if not kept:
        raise ValueError("kept must list at least one fraction")
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    blocks = -(-tokens // block_size)

    with dense_sdpa_context():
        dense = time_fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v), device=device,
                        reference=rows_reference(), check_group=block_size, repeats=repeats, seed=seed)
    cuda = str(device).startswith("cuda")
    res = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "batch": batch, "block_size": block_size,
           "native_block": native_block, "dtype": _dtype_name(dtype), "ours_backend": ours_backend, "device": device_name(device),
           "torch": torch.__version__, "date": datetime.date.today().isoformat(), "dense_ms": dense.median_ms,
           "dense_tflops": 4.0 * batch * heads * tokens * tokens * head_dim / dense.median_ms / 1e9,
           "timing": dense.summary(), "rows": []}
    for fraction in kept:
        mask = random_block_mask(batch, heads, blocks, fraction, device=device, generator=g)
        idx, cnt = mask_to_indices(mask)
        reference = rows_reference(_block_allowed(mask, block_size, tokens))
        calls = {name: _block_sparse_call(block_sparse_attention, idx, cnt, block_size, backend)
                 for name, backend in (("ours", ours_backend), ("flex", "flex"))}
        calls["flex_prebuilt"] = _flex_by_hand(mask, block_size, tokens, compiled=cuda)
        ms = {name: time_fn(call, (q, k, v), device=device, reference=reference, check_group=block_size,
                            repeats=repeats, seed=seed).median_ms for name, call in calls.items()}
        flops = block_sparse_flops(cnt, block_size, tokens, head_dim)
        share = float(mask.float().mean())
        row = {"kept_target": fraction, "kept": share, "blocks_per_row": int(cnt.max()),
               "ours_ms": ms["ours"], "flex_ms": ms["flex"], "flex_prebuilt_ms": ms["flex_prebuilt"],
               "ours_speedup": dense.median_ms / ms["ours"], "flex_speedup": dense.median_ms / ms["flex"],
               "flex_prebuilt_speedup": dense.median_ms / ms["flex_prebuilt"], "ideal_speedup": 1.0 / share,
               "ours_effective_tflops": flops / ms["ours"] / 1e9, "flex_effective_tflops": flops / ms["flex"] / 1e9,
               "flex_prebuilt_effective_tflops": flops / ms["flex_prebuilt"] / 1e9}
        if native_block is not None and native_block != block_size:
            nb = -(-tokens // native_block)
            mask_n = random_block_mask(batch, heads, nb, fraction, device=device, generator=g)
            idx_n, cnt_n = mask_to_indices(mask_n)
            ref_n = rows_reference(_block_allowed(mask_n, native_block, tokens))
            ms_n = {name: time_fn(call, (q, k, v), device=device, reference=ref_n, check_group=native_block,
                                  repeats=repeats, seed=seed).median_ms
                    for name, call in (("ours", _block_sparse_call(block_sparse_attention, idx_n, cnt_n, native_block,
                                                                   ours_backend)),
                                       ("flex", _flex_by_hand(mask_n, native_block, tokens, compiled=cuda)))}
            row.update(kept_native=float(mask_n.float().mean()), ours_native_ms=ms_n["ours"],
                       flex_native_ms=ms_n["flex"], ours_native_speedup=dense.median_ms / ms_n["ours"],
                       flex_native_speedup=dense.median_ms / ms_n["flex"])
        res["rows"].append(row)
    return res
