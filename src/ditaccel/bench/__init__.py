"""``ditaccel bench``: speed of attention kernels at real shapes and of full-size architectures
with random weights (no downloads). A tool: it uses the library (``ditaccel`` and its kernels),
the library never uses it.

- ``harness``: timing (reference check first, CUDA events after warm-up, median; L2-cold inputs)
- ``kernel_cases``: ``attention``, ``adaspa``, ``sparsity`` (kernels alone)
- ``model_cases``: ``step``, ``adaspa-step``, ``sweep``, PixArt plan, HunyuanVideo, attention share,
  calibration time at full size (``bench_calibrate``)
- ``report``: Markdown tables, one-line summaries, JSON and PNG outputs, BENCHMARKS.md sections
- ``cases``: the ``CASES`` registry and ``run_all`` (``ditaccel bench all [--dry-run]``)
- ``command``: the ``ditaccel bench`` options and ``run``; ``python -m ditaccel.bench`` (``main``)

Dense SDPA runs with cuDNN first in the backend priority (the fastest on H100), never
FlashAttention-2 as the baseline.
"""

from .cases import CASES, Case, run_all
from .command import DESCRIPTION, add_arguments, main, run
from .harness import CheckFailed, Timing, dense_sdpa_context, time_fn
from .kernel_cases import bench_adaspa, bench_attention, bench_sparsity, random_block_mask, structured_qkv
from .model_cases import (MODELS, STEP_METHODS, TOY_PIXART, TOY_WAN, bench_adaspa_step, bench_attention_share,
                          bench_calibrate, bench_hunyuan_adaspa, bench_pixart_plan, bench_step, bench_sweep,
                          build_transformer, model_inputs)

__all__ = ["CASES", "DESCRIPTION", "MODELS", "STEP_METHODS", "TOY_PIXART", "TOY_WAN", "Case", "CheckFailed", "Timing",
           "add_arguments", "bench_adaspa", "bench_adaspa_step", "bench_attention", "bench_attention_share",
           "bench_calibrate", "bench_hunyuan_adaspa", "bench_pixart_plan", "bench_sparsity", "bench_step",
           "bench_sweep", "build_transformer", "dense_sdpa_context", "main", "model_inputs", "random_block_mask", "run",
           "run_all", "structured_qkv", "time_fn"]
