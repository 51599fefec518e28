"""The timing harness of ``ditaccel bench``: an output check against an exact reference first,
then CUDA events around each run after a warm-up (median of many; ``time.perf_counter`` on the
CPU), inputs rotated over copies so that small cases do not run from the L2 cache
(:func:`time_fn`); whole-model timing per step (:func:`_cuda_time`); dense SDPA with cuDNN first
(:func:`dense_sdpa_context`). No case lives here."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def dense_sdpa_context():
    """SDPA with cuDNN attention first in the priority list (falls back if unsupported)."""
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch without set_priority
        return contextlib.nullcontext()


@contextlib.contextmanager
def trivial_masks_dropped():
    """Within it, an SDPA call whose boolean ``attn_mask`` keeps every key runs without it: the same
    output, and SDPA is free to pick its fastest backend (a masked call may not get cuDNN). diffusers'
    HunyuanVideo always passes a [B, 1, 1, N] text mask, all True when no text token is padding (the
    benches' inputs); with it dense SDPA runs 1.46x slower at HunyuanVideo's size (H200,
    ``scripts/probe_mask_costs.py``, BENCHMARKS.md "Issue 19, third pass"). ditaccel's processors drop
    such a mask themselves (``processors._key_padding``); this does the same for dense. Patches
    ``torch.nn.functional.scaled_dot_product_attention`` (looked up at call time by diffusers'
    attention dispatch) and restores it on exit."""
    real = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        if len(args) > 3:
            args = list(args)
            if _no_op_mask(args[3]):
                args[3] = None
        elif _no_op_mask(kwargs.get("attn_mask")):
            kwargs["attn_mask"] = None
        return real(*args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _no_op_mask(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and bool(mask.all())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tflops(value: float) -> str:
    """TFLOP/s for a table: whole numbers on a GPU, two significant digits for small CPU values."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def _check_positive_ints(**values) -> None:
    for name, val in values.items():
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


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


def _meta(device: str, dtype) -> dict:
    import triton

    return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "dtype": str(dtype).replace("torch.", "")}


def _peak_reset(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak(device: str, base: int) -> int:
    return torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else 0
