"""``ditaccel bench``'s options (mounted into the ``ditaccel`` parser tree by ``ditaccel.cli``) and
its ``run``: one case alone, or ``all`` (:mod:`ditaccel.bench.cases`)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..cli_support import (
    TOOL_DTYPES,
    UsageError,
    check_out_dir,
    check_out_file,
    default_device,
    check_device,
    positive_int,
    subcommand,
    subcommands,
    tool_main,
)
from .cases import CASES, select_cases, run_all
from .kernel_cases import SPARSITY_KEPT, bench_adaspa, bench_attention, bench_sparsity
from .model_cases import MODELS, bench_adaspa_step, bench_step, bench_sweep
from .report import (
    format_adaspa,
    format_adaspa_step,
    format_step,
    format_sweep,
    markdown_sparsity,
    missing_matplotlib,
    plot_sparsity,
    sparsity_shapes,
)

DESCRIPTION = ("Speed of attention kernels and full-size architectures (random weights). `all` runs every case "
               "behind README/BENCHMARKS numbers and writes their tables into BENCHMARKS.md.")


def _fractions(text: str) -> tuple[float, ...]:
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
    sub = subcommands(parser, "what", "WHAT")

    def case(name, help):
        p = subcommand(sub, name, help=help, func=run)
        p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
        p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's)")
        return p

    def dtype(p):
        p.add_argument("--dtype", choices=list(TOOL_DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")

    def json_out(p):
        p.add_argument("--json", help="also write the results here (default: no file)")

    def window(p):
        p.add_argument("--window", choices=["band1d", "neighborhood2d"], default="band1d", help="window attention kind")

    def shape(p, tokens, heads, head_dim, batch):
        p.add_argument("--tokens", type=positive_int, default=tokens, help="sequence length")
        p.add_argument("--heads", type=positive_int, default=heads, help="attention heads")
        p.add_argument("--head-dim", type=positive_int, default=head_dim, help="head dimension")
        p.add_argument("--batch", type=positive_int, default=batch, help="batch size")

    kernel_repeats = "timed runs per kernel (default: 20 on CUDA, 3 on CPU)"
    block_size = "block size in tokens (the Triton kernel takes 16, 32, 64 or 128)"

    p = case("step", "one denoising step of a full-size transformer, dense vs. a DiTFastAttn plan")
    p.add_argument("--model", choices=sorted(MODELS), default="pixart-sigma-2k", help="architecture (released config)")
    window(p)
    p.add_argument("--repeats", type=positive_int, default=5, help="generations per step")
    dtype(p)
    json_out(p)

    p = case("attention", "window attention kernels against dense SDPA")
    shape(p, 16384, 16, 72, 2)
    window(p)
    p.add_argument("--repeats", type=positive_int, help=kernel_repeats)
    dtype(p)
    json_out(p)

    p = case("sweep", "calibrate D1..D6 on a built-in model: FLOPs, time and PSNR of each plan")
    p.add_argument("--model", default="tiny-dit", help="a built-in offline model (tiny-dit, tiny-pixart, demo-dit, "
                   "...) or a pipeline id/path")
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps")
    window(p)
    p.add_argument("--search", choices=["greedy", "local"], default="greedy", help="plan search")
    json_out(p)

    p = case("adaspa", "AdaSpa's kernels: the block-mass search (first / with cached LSE) and block-sparse attention")
    p.add_argument("--block-size", type=positive_int, default=64, help=block_size)
    p.add_argument("--repeats", type=positive_int, help=kernel_repeats)
    dtype(p)
    json_out(p)

    p = case("adaspa-step", "AdaSpa on a Wan2.1 1.3B transformer, step by step (warm-up, search, sparse)")
    p.add_argument("--repeats", type=positive_int, default=5, help="generations per step")
    dtype(p)
    json_out(p)

    p = case("sparsity", "block-sparse attention time against the kept fraction of key blocks")
    shape(p, 118_784, 24, 128, 1)
    p.add_argument("--block-size", type=positive_int, default=64, help=block_size)
    p.add_argument("--kept", type=_fractions, default=SPARSITY_KEPT,
                   help=f"kept fractions of key blocks, comma-separated (default: {','.join(f'{x:g}' for x in SPARSITY_KEPT)})")
    p.add_argument("--repeats", type=positive_int, help=kernel_repeats)
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


def _check_args(args) -> str | None:
    """Everything ``run`` can check before any work (one-line ``UsageError``s); the device
    (``auto`` resolved; None: the case's default)."""
    if args.what == "all":
        if args.dry_run and args.device not in (None, "cpu"):
            raise UsageError("--device", f"{args.device!r}: --dry-run runs on the CPU; leave --device out")
        select_cases(args.only)
        check_out_file("--out-md", args.out_md)
        if args.results_dir is not None:
            check_out_dir("--results-dir", args.results_dir)
    else:
        check_out_file("--json", args.json)
        if args.what == "sparsity":
            check_out_file("--plot", args.plot, image=True)
    return None if args.device is None else check_device(args.device)


def run(args) -> int:
    """``ditaccel bench WHAT [options]`` (parsed by ``add_arguments``): 0 on success, 1 if a case of
    ``all`` failed; bad arguments raise ``ValueError`` (the command line's one-line error)."""
    device = _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "all":
        return run_all(args.only, device, args.dry_run, args.out_md, args.results_dir)
    device = device or default_device()
    dtype = getattr(args, "dtype", None)
    dtype = TOOL_DTYPES[dtype] if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
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


def main(argv=None) -> int:
    """``ditaccel bench WHAT [options]`` (the same parser and errors as ``ditaccel bench``): 0 on
    success, 2 on bad arguments, 1 if a case of ``all`` failed."""
    return tool_main("bench", add_arguments, argv, description=DESCRIPTION)
