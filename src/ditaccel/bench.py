"""Speed measurements: attention kernels at real shapes and full-size architectures with random
weights (no downloads), and the harness that runs them all.

Cases (``ditaccel bench CASE``):

* ``step``: per-denoising-step time of a full-size transformer, dense vs. a hand-made DiTFastAttn
  plan whose every step uses one method across all layers, so each step's time is that method's.
* ``attention``: the attention kernels alone (dense SDPA vs. window attention), effective TFLOP/s.
* ``sweep``: calibration time, attention FLOPs and PSNR at D1..D6 on a built-in tiny model (CPU).
* ``adaspa``: AdaSpa's kernels (search and block-sparse attention) at a video shape.
* ``adaspa-step``: per-step time of a full-size Wan2.1 transformer under AdaSpa's schedule.
* ``sparsity``: block-sparse attention speed-up vs. the kept fraction of key blocks, ours vs.
  compiled FlexAttention vs. dense SDPA, with a PNG plot.
* ``all``: every case in :data:`CASES` (each backs numbers in README.md / BENCHMARKS.md): prints
  each table and writes it as a Markdown section, the raw JSON and the plots
  (:mod:`ditaccel.bench_report`). ``--dry-run`` runs the same plumbing on the CPU at toy sizes.

Kernel timing (:func:`time_fn`): an output check against an exact reference first, then CUDA
events around each run after a warm-up, median of 20 runs (configurable), inputs rotated over
copies so that small cases do not run from the L2 cache; ``time.perf_counter`` and 3 runs on the CPU. Model-level
cases time whole transformer calls per step (:func:`_cuda_time`). Dense SDPA runs with cuDNN first
in the backend priority (the fastest on H100), never FlashAttention-2 as the baseline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable

import torch
import torch.nn.functional as F

from . import bench_models
from .bench_report import (device_name, environment, jsonable, missing_matplotlib, plot_sparsity, render_section,
                           result_stem, update_markdown, write_json)

#: PixArt-Sigma-XL-2-2K-MS transformer architecture (diffusers config), random weights
PIXART_SIGMA_2K = dict(
    sample_size=256, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
    attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
    num_embeds_ada_norm=1000, upcast_attention=False, use_additional_conditions=False, interpolation_scale=None,
    dropout=0.0, attention_type="default", norm_num_groups=32,
)
#: DiT-XL-2-512 transformer architecture
DIT_XL_2_512 = dict(
    sample_size=64, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
    attention_head_dim=72, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", activation_fn="gelu-approximate",
    attention_bias=True, norm_elementwise_affine=False, upcast_attention=False,
)
MODELS = {"pixart-sigma-2k": PIXART_SIGMA_2K, "dit-xl-2-512": DIT_XL_2_512}

#: the hand-made plan's columns: one method per step for all layers
STEP_METHODS = ["full", "wars", "wars+asc", "asc", "ast", "full", "ast", "asc"]

#: toy sizes of the same architectures, for ``ditaccel bench all --dry-run`` on the CPU
TOY_PIXART = dict(sample_size=16, num_layers=1, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                  caption_channels=32)
TOY_WAN = dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=1,
               rope_max_seq_len=32)

#: kept fractions of key blocks that ``ditaccel bench sparsity`` measures by default
SPARSITY_KEPT = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)


def dense_sdpa_context():
    """SDPA with cuDNN attention first in the priority list (falls back if unsupported)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch without set_priority
        return contextlib.nullcontext()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tflops(value: float) -> str:
    """TFLOP/s for a table: whole numbers on a GPU, two significant digits for small CPU values."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def _check_positive_ints(**values) -> None:
    for name, val in values.items():
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


# ------------------------------------------------------------------------------ timing
#: L2 cache assumed when the GPU does not report its size (H100: 50 MB)
DEFAULT_L2_BYTES = 50 * 10**6
#: cache assumed on the CPU when choosing how many input copies to rotate through
CPU_CACHE_BYTES = 32 * 2**20
#: (rtol, atol) of the output check by input dtype: |out - ref| <= atol + rtol * max|ref|
CHECK_TOLERANCE = {torch.float64: (1e-6, 1e-9), torch.float32: (5e-3, 1e-5), torch.float16: (1e-2, 1e-4),
                   torch.bfloat16: (3e-2, 1e-3)}


class CheckFailed(RuntimeError):
    """A kernel's output disagrees with its reference (raised before anything is timed)."""


@dataclasses.dataclass
class Timing:
    """One measurement by :func:`time_fn`.

    ``median_ms`` is the median of ``times_ms`` (one entry per timed run); ``copies`` the number
    of distinct input sets the runs cycled through; ``warmup`` the untimed runs before them;
    ``checked_rows`` the output rows compared with the reference (None: no reference given).
    """

    median_ms: float
    times_ms: list[float]
    copies: int
    warmup: int
    checked_rows: int | None

    def summary(self) -> dict:
        """The JSON-able description of how it was measured (without the per-run times)."""
        return {"repeats": len(self.times_ms), "warmup": self.warmup, "input_copies": self.copies,
                "checked_rows": self.checked_rows}


def cache_bytes(device: str) -> int:
    """The cache a run's inputs must not be left in: the GPU's L2, or :data:`CPU_CACHE_BYTES`."""
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)
    return CPU_CACHE_BYTES


def memory_budget(device: str) -> int:
    """Bytes the extra input copies may take: a quarter of the free GPU memory, 1 GiB on the CPU."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free // 4
    return 2**30


def rotation_copies(set_bytes: int, cache: int, budget: int, limit: int) -> int:
    """How many copies of an input set (``set_bytes``) to cycle through: enough that together
    they exceed ``2 * cache`` (so the copy a run reads was evicted by the runs since its last
    use), with the extra copies within ``budget`` bytes, and at most ``limit`` (no more copies
    than runs). At least 1 (the inputs themselves)."""
    if set_bytes <= 0:
        return 1
    wanted = -(-2 * cache // set_bytes)
    affordable = 1 + budget // set_bytes
    return max(1, min(wanted, affordable, limit))


def sample_rows(n: int, group: int, max_rows: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted int64 indices of the output rows to check, out of ``n``: all of them when
    ``n <= max_rows``, else about ``max_rows`` rows as whole groups of ``group`` consecutive rows
    (a kernel's query block) picked at random, the last (possibly ragged) group always included."""
    if n <= max_rows:
        return torch.arange(n)
    groups = -(-n // group)
    want = min(groups, max(1, max_rows // group))
    picked = torch.randperm(groups - 1, generator=generator)[: want - 1].tolist() + [groups - 1]
    rows = torch.cat([torch.arange(g * group, min(n, (g + 1) * group)) for g in sorted(picked)])
    return rows


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _check_output(out, reference, inputs, *, rows_max: int, group: int, rtol: float, atol: float,
                  generator: torch.Generator) -> int:
    outs = _as_tuple(out)
    rows = sample_rows(outs[0].shape[2], group, rows_max, generator).to(outs[0].device)
    refs = _as_tuple(reference(rows, *inputs))
    if len(refs) != len(outs):
        raise ValueError(f"reference returned {len(refs)} tensor(s) for the {len(outs)} output(s) of the kernel")
    for i, (o, r) in enumerate(zip(outs, refs)):
        got = o.index_select(2, rows).to(r.dtype)
        if got.shape != r.shape:
            raise ValueError(f"reference output {i} has shape {tuple(r.shape)}, the kernel's rows {tuple(got.shape)}")
        err = float((got - r).abs().max())
        bound = atol + rtol * float(r.abs().max())
        if not err <= bound:  # also catches NaN
            raise CheckFailed(f"output {i}: max |out - reference| = {err:.3g} > {bound:.3g} on {rows.numel()} "
                              f"checked rows (rtol {rtol:g}, atol {atol:g})")
    return int(rows.numel())


def time_fn(fn: Callable, inputs: tuple, *, device: str, reference: Callable | None = None, check_rows: int = 256,
            check_group: int = 1, rtol: float | None = None, atol: float | None = None, repeats: int | None = None,
            warmup: int | None = None, warmup_ms: float | None = None, cache: int | None = None,
            budget: int | None = None, seed: int = 0) -> Timing:
    """Median time of ``fn(*inputs)`` in milliseconds, after a correctness check and a warm-up.

    1. ``fn(*inputs)`` runs once (it compiles or autotunes here). With a ``reference``, its output
       (a tensor, or a tuple of tensors) is checked: dim 2 of each indexes rows (``(B, H, L, D)``
       outputs, ``(B, H, L)`` LSEs, ``(B, H, NQ, NK)`` block maps) and ``reference(rows, *inputs)``
       returns the same structure for just those rows (``rows``: int64 on the output's device).
       All rows are checked up to ``check_rows``; beyond that a random subset of whole
       ``check_group``-row groups (the kernel's query block), so that the reference of a huge
       shape costs a few rows. ``max|out - ref| > atol + rtol * max|ref|`` (defaults by the
       first input's dtype, :data:`CHECK_TOLERANCE`) raises :class:`CheckFailed`.
    2. The tensors of ``inputs`` are cloned into :func:`rotation_copies` copies (``cache``:
       default :func:`cache_bytes`, ``budget``: :func:`memory_budget`) and every following run
       takes the next copy in turn, so a small case does not read what the previous run left in
       the cache. Non-tensor inputs are shared; state captured by ``fn`` is not copied.
    3. Warm-up: at least ``warmup`` runs and at least ``warmup_ms`` of wall time, so that a
       short kernel also finds the GPU at its steady clock (on an H100, a 2.5 ms window kernel
       still ran up to 20% slower in the first timed runs after 5 warm-up runs).
       Then ``repeats`` timed runs: CUDA events around each run and one synchronisation at the
       end on CUDA, ``time.perf_counter`` around each run elsewhere. Defaults: 5 runs and 200 ms
       of warm-up, 20 timed runs on CUDA; 1 run, 3 timed runs on the CPU.
    """
    cuda = str(device).startswith("cuda")
    repeats = (20 if cuda else 3) if repeats is None else repeats
    warmup = (5 if cuda else 1) if warmup is None else warmup
    warmup_ms = (200.0 if cuda else 0.0) if warmup_ms is None else warmup_ms
    _check_positive_ints(repeats=repeats, check_rows=check_rows, check_group=check_group)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(warmup_ms, bool) or not isinstance(warmup_ms, (int, float)) or not warmup_ms >= 0:
        raise ValueError(f"warmup_ms must be a number >= 0, got {warmup_ms!r}")
    inputs = tuple(inputs)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    first = tensors[0].dtype if tensors else torch.float32
    default_rtol, default_atol = CHECK_TOLERANCE.get(first, CHECK_TOLERANCE[torch.float32])

    out = fn(*inputs)
    checked = None
    if reference is not None:
        checked = _check_output(out, reference, inputs, rows_max=check_rows, group=check_group,
                                rtol=default_rtol if rtol is None else rtol,
                                atol=default_atol if atol is None else atol,
                                generator=torch.Generator().manual_seed(seed))
    del out

    set_bytes = sum(t.numel() * t.element_size() for t in tensors)
    n = rotation_copies(set_bytes, cache_bytes(device) if cache is None else cache,
                        memory_budget(device) if budget is None else budget, repeats)
    copies = [inputs] + [tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs) for _ in range(n - 1)]
    runs, t0 = 0, time.perf_counter()
    while runs < warmup or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        fn(*copies[runs % n])
        runs += 1
        if cuda:
            torch.cuda.synchronize(torch.device(device))  # wall time = GPU time
    order = [copies[(runs + i) % n] for i in range(repeats)]
    if cuda:
        torch.cuda.synchronize(torch.device(device))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for (start, end), args in zip(events, order):
            start.record()
            fn(*args)
            end.record()
        torch.cuda.synchronize(torch.device(device))
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for args in order:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), times, n, runs, checked)


def attention_rows_reference(q, k, v, rows, *, allowed: Callable | None = None, scale: float | None = None,
                             return_lse: bool = False):
    """Exact softmax attention for query ``rows`` only: ``(B, H, R, D)`` float32 (float64 for
    float64 inputs), plus the natural-log row LSE ``(B, H, R)`` with ``return_lse``.

    ``allowed(b, h, rows)`` returns the bool ``(R, L)`` keys those rows may attend (None: all).
    One (batch, head) at a time, so memory is O(R * L) however large the shape.
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, _, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(B, H, rows.numel(), v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.empty(B, H, rows.numel(), dtype=cdt, device=q.device)
    for b in range(B):
        for h in range(H):
            s = (q[b, h, rows].to(cdt) @ k[b, h].to(cdt).T) * scale
            if allowed is not None:
                s = s.masked_fill(~allowed(b, h, rows), float("-inf"))
            lse[b, h] = torch.logsumexp(s, dim=-1)
            out[b, h] = torch.exp(s - lse[b, h, :, None]) @ v[b, h].to(cdt)
    return (out, lse) if return_lse else out


def rows_reference(allowed: Callable | None = None) -> Callable:
    """``reference(rows, q, k, v)`` for :func:`time_fn`: :func:`attention_rows_reference` with
    the mask ``allowed`` (None: dense attention)."""
    def reference(rows, q, k, v):
        return attention_rows_reference(q, k, v, rows, allowed=allowed)

    return reference


def block_mass_rows_reference(q, k, lse, blocks, *, block_size: int, scale: float | None = None):
    """:func:`ditaccel.kernels.block_mass.block_mass` for the query ``blocks`` only: float32
    ``(B, H, P, NB)``, ``W[b, h, p, c] = sum_{i in block p, j in block c} exp(q_i . k_j * scale -
    lse_i)`` (ragged last blocks: missing tokens count nothing). One (batch, head) at a time."""
    B, H, L, D = q.shape
    scale = D**-0.5 if scale is None else scale
    nb = -(-L // block_size)
    rows = (blocks[:, None] * block_size + torch.arange(block_size, device=blocks.device)).flatten()
    real = rows < L
    rows = rows.clamp(max=L - 1)
    W = torch.empty(B, H, blocks.numel(), nb, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(H):
            p = torch.exp((q[b, h, rows].float() @ k[b, h].float().T) * scale - lse[b, h, rows, None].float())
            p = F.pad(p * real[:, None], (0, nb * block_size - L))
            W[b, h] = p.view(blocks.numel(), block_size, nb, block_size).sum(dim=(1, 3))
    return W


def _cuda_time(fn, device) -> float:
    """One call of ``fn`` in ms: CUDA events on CUDA, ``time.perf_counter`` elsewhere (model-level
    cases, whose steps are timed one by one)."""
    if not device.startswith("cuda"):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


# ------------------------------------------------------------------------------ cases
def build_transformer(model: str, device: str, dtype: torch.dtype, seed: int = 0, overrides: dict | None = None):
    """The random-weight transformer of ``MODELS[model]``, config entries replaced by ``overrides``
    (toy sizes for dry runs)."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    cls = PixArtTransformer2DModel if model.startswith("pixart") else DiTTransformer2DModel
    torch.manual_seed(seed)
    with torch.device(device):
        tr = cls(**{**MODELS[model], **(overrides or {})})
    return tr.to(dtype).eval().requires_grad_(False)


def model_inputs(model: str, transformer, batch: int, device: str, dtype: torch.dtype):
    cfg = transformer.config
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device, dtype=dtype, generator=g)
    x = x.expand(batch, -1, -1, -1).contiguous()  # CFG: identical halves, as pipelines pass them
    if model.startswith("pixart"):
        ctx = torch.randn(batch, 300, cfg.caption_channels, device=device, dtype=dtype, generator=g)
        return {"hidden_states": x, "encoder_hidden_states": ctx,
                "encoder_attention_mask": torch.ones(batch, 300, device=device)}
    labels = torch.tensor([207] * (batch // 2) + [1000] * (batch - batch // 2), device=device)
    return {"hidden_states": x, "class_labels": labels}


def bench_step(model: str = "pixart-sigma-2k", device: str = "cuda", dtype=torch.bfloat16, batch: int = 2,
               repeats: int = 5, window: str = "band1d", overrides: dict | None = None) -> dict:
    """Per-step transformer time: dense vs. each DiTFastAttn method (a hand-made plan), median of
    ``repeats`` generations per step. ``overrides`` replaces config entries (toy sizes)."""
    import ditaccel
    from ditaccel.plan import Plan

    tr = build_transformer(model, device, dtype, overrides=overrides)
    inputs = model_inputs(model, tr, batch, device, dtype)
    n_layers = len(tr.transformer_blocks)
    steps = len(STEP_METHODS)
    timesteps = torch.linspace(999, 1, steps).round()
    grid = tr.config.sample_size // tr.config.patch_size

    def generation():
        times = []
        for t in timesteps:
            ts = torch.full((batch,), float(t), device=device)
            times.append(_cuda_time(lambda: tr(timestep=ts, **inputs), device))
        return times

    results = {"model": model, "layers": n_layers, "tokens": grid * grid, "batch": batch,
               "heads": tr.config.num_attention_heads, "head_dim": tr.config.attention_head_dim,
               "dtype": _dtype_name(dtype), "device": device_name(device), "torch": torch.__version__,
               "window": window, "repeats": repeats, "date": datetime.date.today().isoformat()}
    with torch.no_grad(), dense_sdpa_context():
        generation()  # warm-up
        dense = [generation() for _ in range(repeats)]
        plan = Plan.from_methods(tr, [list(STEP_METHODS) for _ in range(n_layers)], cfg=True, window=window)
        ditaccel.apply(tr, plan)
        try:
            generation()  # warm-up (compiles the window kernel)
            fast = [generation() for _ in range(repeats)]
            st = ditaccel.stats(tr)
        finally:
            ditaccel.remove(tr)
    dense_step = statistics.median(x for run in dense for x in run)
    per_step = [statistics.median(run[s] for run in fast) for s in range(steps)]
    results.update(
        dense_step_ms=dense_step,
        steps=[{"step": s, "method": STEP_METHODS[s], "ms": per_step[s], "speedup": dense_step / per_step[s]}
               for s in range(steps)],
        plan_total_ms=sum(per_step), dense_total_ms=dense_step * steps,
        attention_flops_ratio=st.attention_flops_ratio, cache_bytes_peak=st.cache_bytes_peak,
    )
    return results


def bench_attention(tokens: int = 16384, heads: int = 16, head_dim: int = 72, batch: int = 2,
                    device: str = "cuda", dtype=torch.bfloat16, window: str = "band1d",
                    window_size: float = 0.25, repeats: int | None = None) -> dict:
    """Dense SDPA (cuDNN priority) vs. window attention at one shape, with TFLOP/s; on CUDA also
    the experimental one-pass full + window kernel. Every kernel is checked against an exact
    reference on sampled rows, then timed by :func:`time_fn` (``repeats``: its default)."""
    from ditaccel.kernels.window import window_attention, window_mask_mod, window_pair_fraction, window_tile_fraction
    from ditaccel.methods.ditfastattn import make_window

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
        from ditaccel.kernels.window_residual import full_and_window_attention

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


def bench_sweep(model: str = "tiny-dit", steps: int = 20, device: str = "cpu", thresholds=None,
                window: str = "band1d", search: str = "greedy") -> dict:
    """Calibrate at each threshold (default D1..D6) on a built-in offline model; report calibration
    time, attention-FLOPs ratio of a generation with the plan, and its PSNR against dense."""
    import numpy as np

    import ditaccel
    from ditaccel.cli import _call_params, _inputs, load_pipeline, psnr
    from ditaccel.methods.ditfastattn import PRESETS
    from ditaccel.viz import to_uint8

    thresholds = thresholds or list(PRESETS)
    pipe = load_pipeline(model, device, torch.float32 if device == "cpu" else torch.bfloat16)
    is_dit = "class_labels" in _call_params(pipe)
    calib = _inputs(pipe, None, None, 8 if is_dit else 6)  # the paper: 8 labels / 6 captions
    sample = _inputs(pipe, None, [3, 404] if is_dit else None, 2)
    if not is_dit:
        sample = {**_inputs(pipe, ["a small house by a lake", "two dogs playing in the snow"], None, 2)}
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in _call_params(pipe) else {}

    def generate():
        g = torch.Generator(device).manual_seed(0)
        return to_uint8(pipe(num_inference_steps=steps, generator=g, output_type="np", **sample, **extra).images)

    dense = generate()
    rows = []
    for th in thresholds:
        cfg = ditaccel.DiTFastAttnConfig(threshold=th, window=window, search=search, show_progress=False)
        t0 = time.perf_counter()
        plan = ditaccel.calibrate(pipe, cfg, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(1),
                                  **calib, **extra)
        seconds = time.perf_counter() - t0
        ditaccel.apply(pipe, plan)
        try:
            img = generate()
            st = ditaccel.stats(pipe)
        finally:
            ditaccel.remove(pipe)
        rows.append({"threshold": th, "delta": cfg.threshold, "calibration_s": seconds,
                     "attention_flops_ratio": st.attention_flops_ratio, "plan_counts": plan.counts(),
                     "psnr_vs_dense": psnr(dense, img), "mean_abs_diff": float(np.abs(dense.astype(int) - img).mean())})
    tr = pipe.transformer
    return {"model": model, "class": type(tr).__name__, "layers": len(tr.transformer_blocks),
            "tokens": plan.metadata.get("tokens"), "steps": steps, "device": device, "window": window,
            "search": search, "torch_threads": torch.get_num_threads(),
            "calibration_inputs": len(next(iter(calib.values()))), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "rows": rows}



def _sweep_title(r: dict) -> str:
    return (f"{r['model']} ({r['class']}, {r['layers']} layers, {r['tokens']} tokens), {r['steps']} steps, "
            f"{r['calibration_inputs']} calibration inputs, window {r['window']}, search {r['search']}, "
            f"{r['device']} ({r['torch_threads']} threads)")


def markdown_sweep(r: dict) -> str:
    """The Markdown table of a :func:`bench_sweep` result."""
    lines = ["| δ | calibration (s) | attention FLOPs | full/wars/ast/asc/wars+asc | PSNR vs dense (dB) |",
             "|---|---|---|---|---|"]
    for x in r["rows"]:
        c = x["plan_counts"]
        counts = "/".join(str(c[m]) for m in ("full", "wars", "ast", "asc", "wars+asc"))
        lines.append(f"| {x['threshold']} ({x['delta']:.3f}) | {x['calibration_s']:.1f} | "
                     f"{100 * x['attention_flops_ratio']:.1f}% | {counts} | {x['psnr_vs_dense']:.1f} |")
    return "\n".join(lines)


def format_sweep(r: dict) -> str:
    return f"{_sweep_title(r)}, torch {r['torch']}, {r['date']}\n{markdown_sweep(r)}"


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
    from ditaccel.kernels.block_mass import attention_with_lse, block_mass
    from ditaccel.kernels.block_sparse import block_sparse_attention, block_sparse_flops, mask_to_indices
    from ditaccel.methods.adaspa import AdaSpaConfig, select_mask, text_blocks

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
    res["select_ms"] = timed(lambda W: select_mask(W, AdaSpaConfig(block_size=block_size), always), (W,))
    res["search_first_ms"] = res["attention_with_lse_ms"] + res["block_mass_ms"] + res["select_ms"]
    res["search_cached_ms"] = res["block_mass_ms"] + res["select_ms"]
    res["sparse"] = []
    for s in sparsities:
        mask, _, rec = select_mask(W, AdaSpaConfig(sparsity=s, block_size=block_size), always)
        idx, cnt = mask_to_indices(mask)
        ms = timed(_block_sparse_call(block_sparse_attention, idx, cnt, block_size, "auto"), (q, k, v),
                   rows_reference(_block_allowed(mask, block_size, L)), check_group=block_size)
        flops = block_sparse_flops(cnt, block_size, L, head_dim)
        res["sparse"].append({"sparsity": s, "density": float(mask.float().mean()), "recall": float(rec.mean()),
                              "ms": ms, "speedup": res["dense_ms"] / ms, "effective_tflops": flops / ms / 1e9})
    res["dense_tflops"] = dense_flops / res["dense_ms"] / 1e9
    res["timing"] = dense.summary()
    return res


def format_adaspa(r: dict) -> str:
    lines = [f"AdaSpa kernels: 1 x {r['heads']} heads x {r['tokens']} tokens x {r['head_dim']}, block {r['block_size']}, "
             f"{r['dtype']}, {r['device']}, torch {r['torch']}, {r['date']}",
             f"  dense SDPA (cuDNN first)        {r['dense_ms']:9.2f} ms  ({r['dense_tflops']:.0f} TFLOP/s)",
             f"  first search: attention + LSE   {r['attention_with_lse_ms']:9.2f} ms",
             f"                block mass        {r['block_mass_ms']:9.2f} ms  ({r['block_mass_ms'] / r['dense_ms']:.2f}x dense)",
             f"                top-k + tiers     {r['select_ms']:9.2f} ms",
             f"  first search total              {r['search_first_ms']:9.2f} ms",
             f"  cached-LSE search total         {r['search_cached_ms']:9.2f} ms"]
    for x in r["sparse"]:
        lines.append(f"  sparse s={x['sparsity']}: density {x['density']:.3f}, recall {x['recall']:.3f}, "
                     f"{x['ms']:.2f} ms ({x['speedup']:.2f}x dense, {x['effective_tflops']:.0f} TFLOP/s effective)")
    return "\n".join(lines)


#: Wan2.1-T2V-1.3B transformer architecture (diffusers config), random weights
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def bench_adaspa_step(frames: int = 21, height: int = 60, width: int = 104, steps: int = 10, sparsities=(0.8, 0.9),
                      device: str = "cuda", dtype=torch.bfloat16, repeats: int = 2,
                      overrides: dict | None = None) -> dict:
    """Per-step time of the full-size Wan2.1-1.3B transformer (random weights; default latent
    21 x 60 x 104 = 480p, 81 frames: 32,760 tokens), dense vs AdaSpa over a whole schedule, median
    of ``repeats`` generations per step. ``overrides`` replaces config entries (toy sizes)."""
    from diffusers import WanTransformer3DModel

    import ditaccel

    config = {**WAN_1_3B, **(overrides or {})}
    torch.manual_seed(0)
    with torch.device(device):
        tr = WanTransformer3DModel(**config)
    tr = tr.to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 16, frames, height, width, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype, generator=g)
    timesteps = torch.linspace(999, 1, steps).round()

    def generation():
        return [_cuda_time(lambda: tr(x, timestep=torch.tensor([float(t)], device=device), encoder_hidden_states=ctx),
                           device) for t in timesteps]

    res = {"model": "wan2.1-t2v-1.3b", "layers": config["num_layers"],
           "tokens": frames * (height // 2) * (width // 2), "steps": steps, "repeats": repeats,
           "dtype": _dtype_name(dtype), "date": datetime.date.today().isoformat(), "device": device_name(device),
           "torch": torch.__version__}
    with torch.no_grad(), dense_sdpa_context():
        generation()
        dense = [generation() for _ in range(repeats)]
        res["dense_step_ms"] = statistics.median(v for run in dense for v in run)
        res["runs"] = []
        for s in sparsities:
            ditaccel.apply(tr, ditaccel.AdaSpaConfig(sparsity=s), num_inference_steps=steps)
            try:
                generation()  # warm-up (compiles the kernels)
                runs = [generation() for _ in range(repeats)]
                st = ditaccel.stats(tr)
            finally:
                ditaccel.remove(tr)
            plan = ditaccel.AdaSpaConfig(sparsity=s).schedule(steps)
            per_step = [statistics.median(run[i] for run in runs) for i in range(steps)]
            res["runs"].append({"sparsity": s, "schedule": plan, "step_ms": per_step, "total_ms": sum(per_step),
                                "attention_flops_ratio": st.attention_flops_ratio,
                                "mean_density": statistics.mean(st.details["density_per_layer"]),
                                "mean_recall": [statistics.mean(r[i] for r in st.details["recall_per_search"])
                                                for i in range(len(st.details["recall_per_search"][0]))],
                                "search_seconds": st.details["search_seconds"]})
    return res


def format_adaspa_step(r: dict) -> str:
    lines = [f"{r['model']} transformer (random weights), {r['tokens']} tokens, {r['steps']} steps, {r['dtype']}, "
             f"{r['device']}, torch {r['torch']}, {r['date']}",
             f"  dense step (SDPA, cuDNN first): {r['dense_step_ms']:.1f} ms; {r['steps']} steps "
             f"{r['dense_step_ms'] * r['steps']:.0f} ms"]
    for run in r["runs"]:
        by = {}
        for what, ms in zip(run["schedule"], run["step_ms"]):
            by.setdefault(what, []).append(ms)
        parts = ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in by.items())
        lines.append(f"  AdaSpa s={run['sparsity']}: {parts}; total {run['total_ms']:.0f} ms "
                     f"({r['dense_step_ms'] * r['steps'] / run['total_ms']:.2f}x), attention FLOPs "
                     f"{100 * run['attention_flops_ratio']:.1f}%, density {run['mean_density']:.3f}, recall "
                     f"{', '.join(f'{x:.3f}' for x in run['mean_recall'])}")
    return "\n".join(lines)


def format_step(r: dict) -> str:
    lines = [f"{r['model']} transformer, {r['tokens']} tokens x batch {r['batch']} (CFG), {r['heads']} heads x "
             f"{r['head_dim']}, {r['dtype']}, {r['device']}, torch {r['torch']}, window {r['window']}, {r['date']}",
             f"  dense step (SDPA, cuDNN first): {r['dense_step_ms']:.1f} ms"]
    for s in r["steps"]:
        lines.append(f"  step {s['step']}  {s['method']:<9} {s['ms']:8.1f} ms   {s['speedup']:.2f}x")
    lines.append(f"  plan total {r['plan_total_ms']:.1f} ms vs dense {r['dense_total_ms']:.1f} ms "
                 f"({r['dense_total_ms'] / r['plan_total_ms']:.2f}x); attention FLOPs "
                 f"{100 * r['attention_flops_ratio']:.1f}%; peak cache {r['cache_bytes_peak'] / 2**30:.2f} GiB")
    return "\n".join(lines)



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
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from ditaccel.kernels.block_sparse import mask_to_indices

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
    from ditaccel.kernels.block_sparse import block_sparse_attention, block_sparse_flops, mask_to_indices

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


def sparsity_shapes(r: dict) -> str:
    """One line: what :func:`bench_sparsity` measured."""
    t = r["timing"]
    return (f"{r['batch']} × {r['heads']} heads × {r['tokens']:,} tokens × {r['head_dim']}, {r['dtype']}, block "
            f"{r['block_size']}; random per-head block masks keeping the diagonal; median of {t['repeats']} runs "
            f"after {t['warmup']} warm-up, {t['input_copies']} input set(s) in rotation, outputs checked against "
            f"an exact reference on {t['checked_rows']} query rows first")


def markdown_sparsity(r: dict) -> str:
    """The Markdown table of a :func:`bench_sparsity` result."""
    bs = r["block_size"]
    lines = [f"Dense SDPA (cuDNN first): {r['dense_ms']:.2f} ms ({_tflops(r['dense_tflops'])} TFLOP/s). "
             "FlexAttention twice: as the `flex` backend runs it (its BlockMask rebuilt from the indices on "
             "every call, time included) and as a user writes it, the BlockMask built once outside the "
             "timed region (\"prebuilt\").", "",
             f"| kept (target) | key blocks per row | ours (`{r['ours_backend']}`) ms | Flex prebuilt ms | "
             "Flex rebuilt per call ms | ours vs dense | Flex prebuilt vs dense | ideal 1/kept | "
             "ours TFLOP/s (effective) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        pre = x.get("flex_prebuilt_ms")
        lines.append(f"| {x['kept']:.4f} ({x['kept_target']:g}) | {x['blocks_per_row']} | {x['ours_ms']:.2f} | "
                     + (f"{pre:.2f}" if pre is not None else "—") + f" | {x['flex_ms']:.2f} | "
                     f"**{x['ours_speedup']:.2f}×** | "
                     + (f"{x['flex_prebuilt_speedup']:.2f}×" if pre is not None else "—")
                     + f" | {x['ideal_speedup']:.2f}× | {_tflops(x['ours_effective_tflops'])} |")
    native = [x for x in r["rows"] if "ours_native_ms" in x]
    if native:
        nb = r["native_block"]
        lines += ["", f"The same at {nb}-token blocks (FlexAttention's native tile; block {bs} above), "
                  "FlexAttention prebuilt:", "",
                  f"| kept (target) | ours ms | Flex ms | ours vs dense | Flex vs dense | ours vs Flex |",
                  "|---|---|---|---|---|---|"]
        for x in native:
            lines.append(f"| {x['kept_native']:.4f} ({x['kept_target']:g}) | {x['ours_native_ms']:.2f} | "
                         f"{x['flex_native_ms']:.2f} | {x['ours_native_speedup']:.2f}× | "
                         f"{x['flex_native_speedup']:.2f}× | {x['flex_native_ms'] / x['ours_native_ms']:.2f}× |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ Markdown tables
def step_shapes(r: dict) -> str:
    return (f"{r['model']} transformer, random weights, {r['layers']} layers, {r['tokens']:,} tokens × batch "
            f"{r['batch']} (CFG), {r['heads']} heads × {r['head_dim']}, {r['dtype']}, window {r['window']}; hand-made "
            f"plan, one method per step for all layers; median of {r['repeats']} generations per step")


def markdown_step(r: dict) -> str:
    """The Markdown table of a :func:`bench_step` result."""
    lines = [f"| step | method | ms | speed-up vs dense ({r['dense_step_ms']:.1f} ms) |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | `{s['method']}` | {s['ms']:.1f} | {s['speedup']:.2f}× |" for s in r["steps"]]
    lines += ["", f"Plan total {r['plan_total_ms']:.1f} ms vs {r['dense_total_ms']:.1f} ms dense "
                  f"({r['dense_total_ms'] / r['plan_total_ms']:.2f}×); attention FLOPs "
                  f"{100 * r['attention_flops_ratio']:.1f}% of dense; peak cache "
                  f"{r['cache_bytes_peak'] / 2**30:.2f} GiB."]
    return "\n".join(lines)


def attention_shapes(r: dict) -> str:
    t = r["timing"]
    return (f"B={r['batch']}, H={r['heads']}, L={r['tokens']:,}, D={r['head_dim']}, {r['dtype']}, window "
            f"`{r['window']}` ({100 * r['pair_fraction']:.1f}% of the (q, k) pairs); median of {t['repeats']} runs, "
            f"{t['input_copies']} input set(s) in rotation, outputs checked first")


def markdown_attention(r: dict) -> str:
    """The Markdown table of a :func:`bench_attention` result."""
    lines = ["| kernel | tiles computed (128×128) | ms | TFLOP/s (effective = kept tiles) | vs dense |",
             "|---|---|---|---|---|",
             f"| dense SDPA (cuDNN first) | 100% | {r['dense_ms']:.2f} | {_tflops(r['dense_tflops'])} | 1.00× |",
             f"| window `{r['window']}` | {100 * r['tile_fraction']:.1f}% | {r['window_ms']:.2f} | "
             f"{_tflops(r['window_effective_tflops'])} | {r['speedup']:.2f}× |"]
    for key, label in (("window_flex_ms", "window, FlexAttention (compiled)"),
                       ("window_triton_ms", "window, tile kernel (Triton)"),
                       ("full_plus_window_two_calls_ms", "full + window, two calls (dense + `auto` window)"),
                       ("full_and_window_one_pass_ms", "full + window, tile kernel: window pass, then the rest "
                                                       "continuing its softmax")):
        if key in r:
            lines.append(f"| {label} | | {r[key]:.2f} | | {r['dense_ms'] / r[key]:.2f}× |")
    return "\n".join(lines)


def adaspa_shapes(r: dict) -> str:
    t = r["timing"]
    return (f"1 × {r['heads']} heads × {r['tokens']:,} tokens × {r['head_dim']} ({r['text_tokens']} text), "
            f"{r['dtype']}, block {r['block_size']}, structured space-time q/k (`structured_qkv`); median of "
            f"{t['repeats']} runs, outputs checked first")


def markdown_adaspa(r: dict) -> str:
    """The Markdown table of a :func:`bench_adaspa` result."""
    d = r["dense_ms"]
    lines = ["| | ms | vs dense | notes |", "|---|---|---|---|",
             f"| dense SDPA | {d:.1f} | 1.00× | {_tflops(r['dense_tflops'])} TFLOP/s |",
             f"| first search: attention + LSE | {r['attention_with_lse_ms']:.1f} | | |",
             f"| first search: block mass | {r['block_mass_ms']:.1f} | | {r['block_mass_ms'] / d:.2f}× a dense call |",
             f"| top-k + head tiers | {r['select_ms']:.1f} | | |",
             f"| **first search total** | {r['search_first_ms']:.1f} | | |",
             f"| **cached-LSE search total** | {r['search_cached_ms']:.1f} | | block mass + selection |"]
    for x in r["sparse"]:
        lines.append(f"| **sparse, s = {x['sparsity']}** (density {x['density']:.3f}, recall {x['recall']:.4f}) | "
                     f"{x['ms']:.1f} | **{x['speedup']:.2f}×** | {_tflops(x['effective_tflops'])} TFLOP/s effective |")
    return "\n".join(lines)


def adaspa_step_shapes(r: dict) -> str:
    return (f"{r['model']} transformer, random weights, {r['layers']} layers, {r['tokens']:,} tokens, "
            f"{r['steps']}-step schedule, {r['dtype']}; median of {r['repeats']} generations per step")


#: AdaSpa schedule phases (``AdaSpaConfig.schedule``) as table columns
_PHASES = (("dense", "dense"), ("search", "first search"), ("sparse", "sparse"), ("research", "cached search"))


def markdown_adaspa_step(r: dict) -> str:
    """The Markdown table of a :func:`bench_adaspa_step` result (per phase: median step time)."""
    dense, n = r["dense_step_ms"], r["steps"]
    head = " | ".join(label for _, label in _PHASES)
    lines = [f"| | {head} | {n} steps | attention FLOPs |", "|---" * (len(_PHASES) + 3) + "|",
             f"| dense SDPA | {dense:.1f} ms |{' |' * (len(_PHASES) - 1)} {dense * n:.0f} ms | 100% |"]
    for run in r["runs"]:
        by = {}
        for what, ms in zip(run["schedule"], run["step_ms"]):
            by.setdefault(what, []).append(ms)
        cells = []
        for phase, _ in _PHASES:
            if phase not in by:
                cells.append("")
                continue
            ms = statistics.median(by[phase])
            cells.append(f"**{ms:.1f} ms ({dense / ms:.2f}×)**" if phase == "sparse" else f"{ms:.1f} ms")
        lines.append(f"| AdaSpa s = {run['sparsity']} | {' | '.join(cells)} | {run['total_ms']:.0f} ms "
                     f"({dense * n / run['total_ms']:.2f}×) | {100 * run['attention_flops_ratio']:.1f}% |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the registry
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark behind numbers in README.md / BENCHMARKS.md, run by ``ditaccel bench all``.

    ``run(**kwargs, device=...)`` returns a JSON-able dict; ``table(result)`` is its Markdown
    table, ``shapes(result)`` one line saying what was measured; ``command`` reruns the case
    alone. ``dry_kwargs`` replace entries of ``kwargs`` for ``--dry-run`` (toy sizes, CPU, 2-3
    runs). ``device``: ``"cpu"`` for cases measured on the CPU whatever ``--device`` says (None:
    the run's device); ``needs_cuda``: refused without a GPU unless dry-running. ``plot(result,
    png_path)``, when set, writes a PNG next to the JSON.
    """

    name: str
    run: Callable[..., dict]
    table: Callable[[dict], str]
    shapes: Callable[[dict], str]
    command: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    dry_kwargs: dict = dataclasses.field(default_factory=dict)
    device: str | None = None
    needs_cuda: bool = True
    plot: Callable[[dict, str], None] | None = None

    def arguments(self, device: str, dry_run: bool) -> dict:
        """The keyword arguments of ``run`` for this invocation."""
        kw = {**self.kwargs, **(self.dry_kwargs if dry_run else {})}
        kw["device"] = "cpu" if dry_run else (self.device or device)
        return kw


_TOY_KERNEL = dict(dtype=torch.float32, repeats=2)
_TOY_SWEEP = dict(steps=2, thresholds=("D6",))


def _sweep_case(model: str, search: str) -> Case:
    return Case(f"sweep-{model}-{search}", bench_sweep, markdown_sweep, _sweep_title,
                f"ditaccel bench sweep --model {model} --steps 20 --device cpu --search {search}",
                kwargs=dict(model=model, steps=20, search=search), dry_kwargs=_TOY_SWEEP, device="cpu",
                needs_cuda=False)


#: every case ``ditaccel bench all`` runs, in order. A new case is one entry.
CASES: list[Case] = [
    Case("pixart-sigma-2k-step", bench_step, markdown_step, step_shapes,
         "ditaccel bench step --model pixart-sigma-2k --repeats 5",
         kwargs=dict(model="pixart-sigma-2k", repeats=5, window="band1d"),
         dry_kwargs=dict(dtype=torch.float32, repeats=2, overrides=TOY_PIXART)),
    Case("attention-band1d", bench_attention, markdown_attention, attention_shapes,
         "ditaccel bench attention --tokens 16384 --head-dim 72",
         kwargs=dict(tokens=16384, head_dim=72, window="band1d"),
         dry_kwargs=dict(tokens=256, heads=2, head_dim=16, batch=1, **_TOY_KERNEL)),
    Case("attention-neighborhood2d", bench_attention, markdown_attention, attention_shapes,
         "ditaccel bench attention --tokens 16384 --head-dim 72 --window neighborhood2d",
         kwargs=dict(tokens=16384, head_dim=72, window="neighborhood2d"),
         dry_kwargs=dict(tokens=256, heads=2, head_dim=16, batch=1, **_TOY_KERNEL)),
    Case("adaspa-kernels", bench_adaspa, markdown_adaspa, adaspa_shapes, "ditaccel bench adaspa",
         dry_kwargs=dict(frames=2, rows=4, cols=8, heads=2, head_dim=32, block_size=16, **_TOY_KERNEL)),
    Case("adaspa-wan-1.3b-steps", bench_adaspa_step, markdown_adaspa_step, adaspa_step_shapes,
         "ditaccel bench adaspa-step --repeats 2", kwargs=dict(repeats=2),
         dry_kwargs=dict(frames=2, height=8, width=8, steps=5, dtype=torch.float32, repeats=1, overrides=TOY_WAN)),
    Case("sparsity", bench_sparsity, markdown_sparsity, sparsity_shapes, "ditaccel bench sparsity",
         dry_kwargs=dict(tokens=128, heads=2, head_dim=16, block_size=16, kept=(1.0, 0.25), native_block=32,
                         ours_backend="auto", **_TOY_KERNEL), plot=plot_sparsity),
    Case("attention-cpu", bench_attention, markdown_attention, attention_shapes,
         "ditaccel bench attention --device cpu --tokens 4096 --head-dim 72 --threads 2",
         kwargs=dict(tokens=4096, head_dim=72, window="band1d", dtype=torch.float32, repeats=5),
         dry_kwargs=dict(tokens=256, heads=2, head_dim=16, batch=1, **_TOY_KERNEL), device="cpu", needs_cuda=False),
    *[_sweep_case(model, search) for model in ("tiny-dit", "tiny-pixart") for search in ("greedy", "local")],
    Case("hunyuan-video-720p-adaspa", bench_models.bench_hunyuan_adaspa, bench_models.markdown_hunyuan,
         bench_models.hunyuan_shapes, "ditaccel bench all --only hunyuan-video-720p-adaspa",
         dry_kwargs=dict(frames=2, height=8, width=8, text_tokens=8, block_size=16, dtype=torch.float32,
                         overrides=bench_models.TOY_HUNYUAN)),
    *[Case(f"attention-share-{m}", bench_models.bench_attention_share, bench_models.markdown_attention_share,
           bench_models.attention_share_shapes, f"ditaccel bench all --only attention-share-{m}",
           kwargs=dict(model=m), dry_kwargs=dict(dtype=torch.float32, repeats=1, video_latent=(2, 8, 8), text_tokens=8,
                                                 overrides=TOY_PIXART if m.startswith("pixart") else
                                                 bench_models.TOY_HUNYUAN))
      for m in ("pixart-sigma-2k", "hunyuan-video-720p")],
    Case("pixart-sigma-2k-plan-50", bench_models.bench_pixart_plan, bench_models.markdown_pixart_plan,
         bench_models.pixart_plan_shapes, "ditaccel bench all --only pixart-sigma-2k-plan-50",
         dry_kwargs=dict(steps=12, dtype=torch.float32, overrides=TOY_PIXART)),
]


# ------------------------------------------------------------------------------ command line
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

DESCRIPTION = ("Speed of attention kernels and full-size architectures (random weights). `all` runs every case "
               "behind README/BENCHMARKS numbers and writes their tables into BENCHMARKS.md.")


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _fractions(text: str) -> tuple[float, ...]:
    import argparse

    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < x <= 1 for x in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated fractions in (0, 1], got {text!r}")
    return values


def add_arguments(parser) -> None:
    """Mount ``bench``'s cases (``step``, ``attention``, ..., ``all``) as subcommands of ``parser``
    (the ``ditaccel bench`` parser of ``ditaccel.cli``), each with only its own options."""
    from .cli import subcommand, subcommands

    sub = subcommands(parser, "what", "WHAT")

    def case(name, help):
        p = subcommand(sub, name, help=help, func=run)
        p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
        p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's)")
        return p

    def dtype(p):
        p.add_argument("--dtype", choices=list(_DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")

    def json_out(p):
        p.add_argument("--json", help="also write the results here (default: no file)")

    def window(p):
        p.add_argument("--window", choices=["band1d", "neighborhood2d"], default="band1d", help="window attention kind")

    def shape(p, tokens, heads, head_dim, batch):
        p.add_argument("--tokens", type=_positive_int, default=tokens, help="sequence length")
        p.add_argument("--heads", type=_positive_int, default=heads, help="attention heads")
        p.add_argument("--head-dim", type=_positive_int, default=head_dim, help="head dimension")
        p.add_argument("--batch", type=_positive_int, default=batch, help="batch size")

    kernel_repeats = "timed runs per kernel (default: 20 on CUDA, 3 on CPU)"
    block_size = "block size in tokens (the Triton kernel takes 16, 32, 64 or 128)"

    p = case("step", "one denoising step of a full-size transformer, dense vs. a DiTFastAttn plan")
    p.add_argument("--model", choices=sorted(MODELS), default="pixart-sigma-2k", help="architecture (released config)")
    window(p)
    p.add_argument("--repeats", type=_positive_int, default=5, help="generations per step")
    dtype(p)
    json_out(p)

    p = case("attention", "window attention kernels against dense SDPA")
    shape(p, 16384, 16, 72, 2)
    window(p)
    p.add_argument("--repeats", type=_positive_int, help=kernel_repeats)
    dtype(p)
    json_out(p)

    p = case("sweep", "calibrate D1..D6 on a built-in model: FLOPs, time and PSNR of each plan")
    p.add_argument("--model", default="tiny-dit", help="a built-in offline model (tiny-dit, tiny-pixart, demo-dit, "
                   "...) or a pipeline id/path")
    p.add_argument("--steps", type=_positive_int, default=20, help="denoising steps")
    window(p)
    p.add_argument("--search", choices=["greedy", "local"], default="greedy", help="plan search")
    json_out(p)

    p = case("adaspa", "AdaSpa's kernels: the block-mass search (first / with cached LSE) and block-sparse attention")
    p.add_argument("--block-size", type=_positive_int, default=64, help=block_size)
    p.add_argument("--repeats", type=_positive_int, help=kernel_repeats)
    dtype(p)
    json_out(p)

    p = case("adaspa-step", "AdaSpa on a Wan2.1 1.3B transformer, step by step (warm-up, search, sparse)")
    p.add_argument("--repeats", type=_positive_int, default=5, help="generations per step")
    dtype(p)
    json_out(p)

    p = case("sparsity", "block-sparse attention time against the kept fraction of key blocks")
    shape(p, 118_784, 24, 128, 1)
    p.add_argument("--block-size", type=_positive_int, default=64, help=block_size)
    p.add_argument("--kept", type=_fractions, default=SPARSITY_KEPT,
                   help=f"kept fractions of key blocks, comma-separated (default: {','.join(f'{x:g}' for x in SPARSITY_KEPT)})")
    p.add_argument("--repeats", type=_positive_int, help=kernel_repeats)
    dtype(p)
    p.add_argument("--plot", default="sparsity.png", help="the PNG to write (needs matplotlib)")
    json_out(p)

    p = case("all", "every case behind README/BENCHMARKS numbers; writes BENCHMARKS.md sections and raw JSON")
    p.add_argument("--only", help=f"comma-separated case names (default: all of {', '.join(c.name for c in CASES)})")
    p.add_argument("--out-md", help="the Markdown file to update (default: BENCHMARKS.md; with --dry-run a "
                   "temporary file)")
    p.add_argument("--results-dir", help="where raw JSON and PNGs go (default: docs/results; with --dry-run "
                   "next to --out-md)")
    p.add_argument("--dry-run", action="store_true", help="every case at toy sizes on the CPU (Triton kernels "
                   "interpreted), to check the plumbing in well under a minute; writes nowhere in the repo unless "
                   "--out-md / --results-dir say so")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_args(args) -> str | None:
    """Everything ``run`` can check before any work (one-line ``UsageError``s); the device
    (``auto`` resolved; None: the case's default)."""
    from .cli import UsageError, _check_out_dir, _check_out_file, _device

    if args.what == "all":
        if args.dry_run and args.device not in (None, "cpu"):
            raise UsageError("--device", f"{args.device!r}: --dry-run runs on the CPU; leave --device out")
        _select(args.only)
        _check_out_file("--out-md", args.out_md)
        if args.results_dir is not None:
            _check_out_dir("--results-dir", args.results_dir)
    else:
        _check_out_file("--json", args.json)
        if args.what == "sparsity":
            _check_out_file("--plot", args.plot, image=True)
    return None if args.device is None else _device(args.device)


def run(args) -> int:
    """``ditaccel bench WHAT [options]`` (parsed by ``add_arguments``): 0 on success, 1 if a case of
    ``all`` failed; bad arguments raise ``ValueError`` (the command line's one-line error)."""
    device = _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "all":
        return run_all(args.only, device, args.dry_run, args.out_md, args.results_dir)
    device = device or _default_device()
    dtype = getattr(args, "dtype", None)
    dtype = _DTYPES[dtype] if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.what == "step":
        r = bench_step(args.model, device, dtype=dtype, repeats=args.repeats, window=args.window)
        print(format_step(r))
    elif args.what == "adaspa-step":
        r = bench_adaspa_step(device=device, dtype=dtype, repeats=args.repeats)
        print(format_adaspa_step(r))
    elif args.what == "adaspa":
        r = bench_adaspa(block_size=args.block_size, device=device, dtype=dtype, repeats=args.repeats)
        print(format_adaspa(r))
    elif args.what == "sweep":
        r = bench_sweep(args.model, args.steps, device, window=args.window, search=args.search)
        print(format_sweep(r))
    elif args.what == "attention":
        r = bench_attention(args.tokens, heads=args.heads, head_dim=args.head_dim, batch=args.batch, device=device,
                            dtype=dtype, window=args.window, repeats=args.repeats)
        print(json.dumps(r, indent=1))
    else:  # sparsity
        no_plot = missing_matplotlib()
        if no_plot:
            print(f"ditaccel bench: {no_plot}", file=sys.stderr)
        r = bench_sparsity(args.tokens, args.heads, args.head_dim, args.batch, args.block_size, args.kept, device,
                           dtype, repeats=args.repeats,
                           ours_backend="triton" if torch.device(device).type == "cuda" else "auto")  # CPU: gather
        print(f"{sparsity_shapes(r)}; {r['device']}, torch {r['torch']}, {r['date']}\n\n{markdown_sparsity(r)}")
        if not no_plot:
            plot_sparsity(r, args.plot)
            print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


@contextlib.contextmanager
def _environ(name: str, value: str):
    """``os.environ[name] = value`` inside the block, the old value (or its absence) back after it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _triton_interpreter(enabled: bool):
    """``TRITON_INTERPRET=1`` inside the block when ``enabled``.

    The repo's kernels read the variable at launch, so setting it here, before the first launch,
    runs them (backend ``"auto"`` / ``"triton"``) in Triton's CPU interpreter. ``triton.language``
    is imported first (by the probe): imported while the variable is set, Triton's own helpers
    would stay interpreted and no CUDA kernel could be compiled later in the process (e.g. in a
    test session). Without Triton, or where its interpreter cannot run the kernels (Triton 3.6
    with numpy >= 2.5), the variable is left alone and ``"auto"`` picks the PyTorch references.
    """
    problem = _interpreter_problem() if enabled else None
    if problem:
        print(f"ditaccel bench: {problem}: the dry run uses the PyTorch reference kernels", file=sys.stderr)
    with _environ("TRITON_INTERPRET", "1") if enabled and not problem else contextlib.nullcontext():
        yield


def _interpreter_problem() -> str | None:
    """None if Triton's interpreter runs the block-sparse kernel on a tiny input, else why not."""
    try:
        import triton.language  # noqa: F401  (is Triton installed?)
    except ImportError:
        return "Triton is not installed"
    from ditaccel.kernels.block_sparse import block_sparse_attention

    q = torch.zeros(1, 1, 16, 16)
    idx, cnt = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    try:
        with _environ("TRITON_INTERPRET", "1"):
            block_sparse_attention(q, q, q, idx, cnt, block_size=16, backend="triton")
    except Exception as e:  # noqa: BLE001 - whatever the failure, the kernels cannot be interpreted here
        return f"Triton's interpreter cannot run the kernels here ({type(e).__name__}: {str(e)[:120]})"
    return None


def _select(only: str | None) -> list[Case]:
    if only is None:
        return list(CASES)
    by_name = {c.name: c for c in CASES}
    names = list(dict.fromkeys(n.strip() for n in only.split(",") if n.strip()))
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ValueError(f"--only: unknown case(s) {', '.join(map(repr, unknown)) or '(none given)'}; known: "
                         f"{', '.join(by_name)}")
    return [by_name[n] for n in names]


def run_all(only: str | None = None, device: str | None = None, dry_run: bool = False, out_md: str | None = None,
            results_dir: str | None = None) -> int:
    """Run the selected :data:`CASES` (``only``: comma-separated names; default all), print each
    table, write it as a section of ``out_md`` and its raw JSON (and PNG) to ``results_dir``.

    Real runs default to ``BENCHMARKS.md`` and ``docs/results`` (relative to the current
    directory: run from the repository root); a dry run (toy sizes, CPU, Triton interpreted) to a
    fresh temporary folder. A case that raises is reported and skipped, the others still run.
    Returns 0, or 1 if a case failed; bad arguments raise ``ValueError``.
    """
    selected = _select(only)
    if dry_run and device not in (None, "cpu"):
        raise ValueError(f"--device {device}: --dry-run runs on the CPU; leave --device out")
    device = "cpu" if dry_run else (device or _default_device())
    if not dry_run and not device.startswith("cuda"):
        gpu = [c.name for c in selected if c.needs_cuda]
        if gpu:
            cpu = [c.name for c in CASES if not c.needs_cuda]
            raise ValueError(f"--device {device}: case(s) {', '.join(gpu)} need a CUDA GPU; select CPU cases with "
                             f"--only ({', '.join(cpu)}) or check the plumbing with --dry-run")
    if dry_run:
        out_md = out_md or os.path.join(tempfile.mkdtemp(prefix="ditaccel-bench-dry-run-"), "BENCHMARKS.md")
        results_dir = results_dir or os.path.join(os.path.dirname(os.path.abspath(out_md)), "results")
    else:
        out_md = out_md or "BENCHMARKS.md"
        results_dir = results_dir or os.path.join("docs", "results")
    md_dir = os.path.dirname(os.path.abspath(out_md))
    no_plot = missing_matplotlib() if any(c.plot for c in selected) else None
    if no_plot:
        print(f"ditaccel bench: {no_plot}", file=sys.stderr)
    date = datetime.date.today().isoformat()
    failed = []
    with _triton_interpreter(dry_run):
        for case in selected:
            command = f"ditaccel bench all --dry-run --only {case.name}" if dry_run else case.command
            print(f"\n== {case.name}: {command}", flush=True)
            kwargs = case.arguments(device, dry_run)
            t0 = time.perf_counter()
            try:
                result = case.run(**kwargs)
                table, shapes = case.table(result), case.shapes(result)
            except Exception:  # noqa: BLE001 - one broken case must not lose the other cases' measurements
                traceback.print_exc()
                failed.append(case.name)
                continue
            seconds = time.perf_counter() - t0
            env = environment(kwargs["device"], date)
            stem = result_stem(results_dir, env, case.name)
            files = [stem + ".json"]
            if case.plot and not no_plot:
                case.plot(result, stem + ".png")
                files.append(stem + ".png")
            write_json(files[0], {"case": case.name, "command": command, "dry_run": dry_run, "environment": env,
                                  "kwargs": jsonable(kwargs), "seconds": seconds, "result": result})
            links = [os.path.relpath(os.path.abspath(f), md_dir) for f in files]
            update_markdown(out_md, case.name, render_section(case.name, env, shapes, command, table, links, dry_run))
            print(f"{shapes}\n\n{table}\n\n({seconds:.1f} s) wrote {', '.join(files)}", flush=True)
    print(f"\n{len(selected) - len(failed)} of {len(selected)} case(s) written to {out_md}; raw results in "
          f"{results_dir}")
    if failed:
        print(f"ditaccel bench: failed: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """``ditaccel bench WHAT [options]`` (the same parser and errors as ``ditaccel bench``): 0 on
    success, 2 on bad arguments, 1 if a case of ``all`` failed."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
