"""The ``ditaccel`` command: demo, calibrate, generate, plan show, eval, testbed train, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

import ditaccel

from . import bench, evaluate, quality, worth
from ._version import __version__
from .bench.report import environment
from .cli_support import (
    DTYPES,
    GUIDANCE,
    POSITIVE,
    SEED,
    TINY_MODELS,
    TRAINED_MODELS,
    UsageError,
    call_params,
    check_in_file,
    check_out_dir,
    check_out_file,
    check_device,
    check_dtype,
    HelpWithDefaults,
    pipeline_inputs,
    is_class_conditional,
    Parser,
    float_in,
    load_pipeline,
    pipeline_progress,
    progress_bar,
    progress_on,
    psnr,
    run_parser,
    subcommand,
    subcommands,
)
from .methods.ditfastattn import CACHE_DTYPES, PRESETS, RESIDUAL_REFRESHES, WINDOW_KINDS
from .plan import Plan
from .quality import check_weights_arg
from .testbed import train
from .viz import abs_diff, grid_rows, plot_plan, side_by_side, to_uint8


def _ditfastattn_config(args, **kw):
    """The DiTFastAttn settings, built (and so checked) before any work."""
    return ditaccel.DiTFastAttnConfig(threshold=args.threshold, **kw)


def _threshold_line(threshold_arg, cfg) -> str:
    named = f" (preset {threshold_arg})" if isinstance(threshold_arg, str) else ""
    return f"threshold δ = {cfg.threshold:g}{named}"


def _check_calibration_steps(steps: int) -> None:
    if steps < 2:
        raise UsageError("--steps", f"{steps} step cannot be compressed: DiTFastAttn always runs step 0 with full "
                                    "attention; calibrate for 2 or more steps")


def _check_class_labels(pipe, labels: list[int] | None) -> None:
    """Class ids must lie in the model's range: checked once it is loaded, before generating."""
    if not labels:
        return
    if not is_class_conditional(pipe):
        raise UsageError("--class-labels", "this model takes prompts, not class labels; use --prompt")
    classes = pipe.transformer.config.num_embeds_ada_norm or 1000  # as pipeline_inputs
    bad = [c for c in labels if not 0 <= c < classes]
    if bad:
        raise UsageError("--class-labels", f"{bad} outside this model's {classes} classes (0..{classes - 1})")


def _generator(device: str, seed: int):
    return torch.Generator(device="cpu" if device == "mps" else device).manual_seed(seed)


def _timed(pipe, device, **kw):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = pipe(**kw)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _finite_or_str(x: float):
    """A float for strict JSON: identical images give PSNR "inf"."""
    return x if x == x and abs(x) != float("inf") else str(x)


# ------------------------------------------------------------------------------ demo plan
#: the testbed's calibrated demo plan, shipped so that ``ditaccel demo`` need not calibrate (minutes on CPU)
DEMO_PLAN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testbed", "weights", "image", "demo_plan.json")
DEMO_WEIGHTS = os.path.join(os.path.dirname(DEMO_PLAN), "transformer", "diffusion_pytorch_model.safetensors")
DEMO_CALIBRATION_SEED = 1
#: how to remake DEMO_PLAN after the testbed's weights or the demo's defaults change
DEMO_PLAN_REGENERATE = '.venv/bin/python -c "from ditaccel.cli import write_demo_plan; write_demo_plan()"'


def _file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def demo_settings(args) -> dict:
    """What a demo plan depends on (besides the weights): recorded in the shipped plan's metadata."""
    threshold = PRESETS.get(args.threshold, args.threshold) if isinstance(args.threshold, str) else args.threshold
    return {"model": args.model, "steps": args.steps, "threshold": float(threshold), "window": args.window,
            "calibration_inputs": args.calibration_inputs, "seed": DEMO_CALIBRATION_SEED}


def shipped_demo_plan(args):
    """``(plan, None)`` if the shipped plan fits ``args``, else ``(None, why)``."""
    if args.model != "testbed":
        return None, f"the shipped plan is for the testbed, not {args.model!r}"
    if not os.path.exists(DEMO_PLAN):
        return None, f"no shipped plan at {DEMO_PLAN}"
    plan = Plan.load(DEMO_PLAN)
    made = plan.metadata.get("demo_settings", {})
    want = demo_settings(args)
    diff = [f"--{k.replace('_', '-')} {want[k]} (plan: {made.get(k)})" for k in want if made.get(k) != want[k]]
    if diff:
        return None, "the shipped plan was made for other settings: " + ", ".join(diff)
    if plan.metadata.get("weights_sha256") != _file_sha256(DEMO_WEIGHTS):
        return None, "the testbed's weights changed since the shipped plan was made"
    return plan, None


def _demo_calibrate(pipe, args, device: str):
    """The demo's calibration (also what made the shipped plan: ``write_demo_plan``)."""
    calib = pipeline_inputs(pipe, None, None, args.calibration_inputs)
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in call_params(pipe) else {}
    config = ditaccel.DiTFastAttnConfig(threshold=args.threshold, window=args.window, show_progress=progress_on(args))
    pipeline_progress(pipe, argparse.Namespace(progress="off"))  # the calibration's own bar counts layers
    plan = ditaccel.calibrate(pipe, config, num_inference_steps=args.steps,
                              generator=_generator(device, DEMO_CALIBRATION_SEED), **calib, **extra)
    plan.metadata["demo_settings"] = demo_settings(args)
    if args.model == "testbed":
        plan.metadata["weights_sha256"] = _file_sha256(DEMO_WEIGHTS)
    return plan


def write_demo_plan(path: str = DEMO_PLAN) -> None:
    """Remake the shipped demo plan: the demo's default settings, on CPU in float32 (minutes)."""
    args = build_parser().parse_args(["demo"])
    pipe = load_pipeline(args.model, "cpu", torch.float32)
    plan = _demo_calibrate(pipe, args, "cpu")
    plan.save(path)
    print(plan.summary())
    print(f"wrote {path}")


# ------------------------------------------------------------------------------ commands
def cmd_demo(args) -> int:
    import numpy as np

    device = check_device(args.device)  # every check before any work
    dtype = check_dtype(args.dtype, device)
    check_out_dir("--out", args.out)
    _check_calibration_steps(args.steps)
    cfg = _ditfastattn_config(args, window=args.window)
    plan, why = (None, "--calibrate") if args.calibrate else shipped_demo_plan(args)
    plan_is_new = plan is None
    print(f"ditaccel demo: model {args.model} on {device} ({str(dtype).replace('torch.', '')}), "
          f"{args.steps} steps, {_threshold_line(args.threshold, cfg)}")
    if not os.path.isdir(args.out):
        os.mkdir(args.out)
    pipe = load_pipeline(args.model, device, dtype)
    sample = pipeline_inputs(pipe, None, None, args.samples)
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in call_params(pipe) else {}

    if plan is not None:
        plan.check_model(pipe.transformer)
        print(f"plan: the shipped testbed plan ({os.path.basename(DEMO_PLAN)}, calibrated for these settings); "
              "pass --calibrate to search it again")
    else:
        print(f"plan: calibrating ({why})")
        t0 = time.perf_counter()
        plan = _demo_calibrate(pipe, args, device)
        print(f"calibrated in {time.perf_counter() - t0:.1f} s on {args.calibration_inputs} inputs")
    plan_path = os.path.join(args.out, "plan.json")
    plan.save(plan_path)
    plot_plan(plan, os.path.join(args.out, "plan.png"))
    print(plan.summary())

    run = dict(num_inference_steps=args.steps, output_type="np", **sample, **extra)
    pipeline_progress(pipe, args, "dense (warm-up)")
    _timed(pipe, device, generator=_generator(device, 0), **run)  # warm-up
    pipeline_progress(pipe, args, "dense")
    dense, t_dense = _timed(pipe, device, generator=_generator(device, 0), **run)
    ditaccel.apply(pipe, plan)
    try:
        pipeline_progress(pipe, args, "ditfastattn (warm-up)")
        _timed(pipe, device, generator=_generator(device, 0), **run)  # warm-up
        pipeline_progress(pipe, args, "ditfastattn")
        fast, t_fast = _timed(pipe, device, generator=_generator(device, 0), **run)
        st = ditaccel.stats(pipe)
    finally:
        ditaccel.remove(pipe)
    a, b = to_uint8(dense.images), to_uint8(fast.images)
    grid_path = os.path.join(args.out, "samples.png")
    side_by_side([("dense", a), ("ditfastattn", b), abs_diff(a, b)], grid_path)
    print("\nresult (same seed, same inputs)")
    print(f"  dense        {t_dense:8.3f} s")
    print(f"  ditfastattn  {t_fast:8.3f} s   speed-up {t_dense / t_fast:.2f}x")
    print(f"  attention FLOPs  {100 * st.attention_flops_ratio:.1f}% of dense")
    print(f"  methods      {st.method_counts}")
    print(f"  difference   PSNR {psnr(a, b):.2f} dB, mean |diff| {np.abs(a.astype(int) - b).mean():.2f}/255")
    result_path = os.path.join(args.out, "result.json")
    with open(result_path, "w") as f:  # the numbers above, for docs/results (scripts/measure_demo.sh)
        json.dump({"settings": demo_settings(args), "plan": f"calibrated ({why})" if plan_is_new else "shipped", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                   "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                   "date": time.strftime("%Y-%m-%d"), "dense_s": t_dense, "ditfastattn_s": t_fast,
                   "speedup": t_dense / t_fast, "attention_flops_ratio": st.attention_flops_ratio,
                   "method_counts": st.method_counts, "psnr_db": _finite_or_str(psnr(a, b)),
                   "mean_abs_diff_255": float(np.abs(a.astype(int) - b).mean())}, f, indent=1)
    print(f"  wrote {grid_path}, {plan_path}, {os.path.join(args.out, 'plan.png')}, {result_path}")
    if args.model in TRAINED_MODELS:
        print("  note: the testbed is a small pixel-space DiT trained on procedural shapes (ditaccel.testbed); "
              "its quality tables are in QUALITY.md")
    elif args.model.startswith(("tiny-", "demo-")):
        print("  note: built-in models have random weights: images are noise, the numbers are what to read")
    return 0


def cmd_calibrate(args) -> int:
    device = check_device(args.device)  # every check before any work
    dtype = check_dtype(args.dtype, device)
    check_out_file("--out", args.out)
    _check_calibration_steps(args.steps)
    cfg = _ditfastattn_config(args, window=args.window, window_size=args.window_size, search=args.search,
                              residual_refresh=args.residual_refresh, cache_dtype=args.cache_dtype,
                              show_progress=progress_on(args))
    print(f"calibrating {args.model}: {args.steps} steps, {_threshold_line(args.threshold, cfg)}, "
          f"search {cfg.search}, window {cfg.window}, residual refresh {cfg.residual_refresh}"
          + (f", caches in {cfg.cache_dtype}" if cfg.cache_dtype != "model" else ""))
    pipe = load_pipeline(args.model, device, dtype)
    _check_class_labels(pipe, args.class_labels)
    kw = pipeline_inputs(pipe, args.prompt, args.class_labels, 8 if is_class_conditional(pipe) else 6)
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if "use_resolution_binning" in call_params(pipe) and args.model in TINY_MODELS:
        kw["use_resolution_binning"] = False
    pipeline_progress(pipe, argparse.Namespace(progress="off"))  # the calibration's own bar counts layers
    plan = ditaccel.calibrate(pipe, cfg, num_inference_steps=args.steps, generator=_generator(device, args.seed), **kw)
    plan.save(args.out)
    print(plan.summary())
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    from PIL import Image

    device = check_device(args.device)  # every check before any work
    dtype = check_dtype(args.dtype, device)
    check_out_file("--out", args.out, image=True)
    check_out_file("--grid", args.grid, image=True)
    check_in_file("--plan", args.plan)
    plan = ditaccel.Plan.load(args.plan) if args.plan else None
    steps = args.steps or (plan.num_steps if plan else 20)
    if plan is not None and steps != plan.num_steps:
        raise UsageError("--steps", f"the plan {args.plan!r} was calibrated for {plan.num_steps} steps but this run "
                                    f"runs {steps} (num_inference_steps must match); omit --steps or calibrate "
                                    f"a plan for {steps} steps")
    pipe = load_pipeline(args.model, device, dtype)
    _check_class_labels(pipe, args.class_labels)
    kw = pipeline_inputs(pipe, args.prompt, args.class_labels, 1)
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if "use_resolution_binning" in call_params(pipe) and args.model in TINY_MODELS:
        kw["use_resolution_binning"] = False
    if plan is not None:
        try:
            ditaccel.apply(pipe, plan)
        except ditaccel.PlanError as e:
            raise UsageError("--plan", f"{args.plan!r} does not fit --model {args.model}: {e}") from None
    run = dict(num_inference_steps=steps, output_type="np", **kw)
    label = "ditfastattn" if plan is not None else "dense"
    try:
        pipeline_progress(pipe, args, label)
        out, seconds = _timed(pipe, device, generator=_generator(device, args.seed), **run)
        st = ditaccel.stats(pipe) if plan is not None else None
    finally:
        ditaccel.remove(pipe)
    images = to_uint8(out.images)
    paths = image_paths(args.out, len(images))
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    print(f"generated {len(images)} image(s) in {seconds:.2f} s -> {', '.join(paths)}")
    if st is not None:
        print(st)
    if args.grid:  # on request only: it costs a dense generation when a plan was applied
        rows = [("dense", images)]
        if plan is not None:
            pipeline_progress(pipe, args, "dense (for --grid)")
            dense, _ = _timed(pipe, device, generator=_generator(device, args.seed), **run)
            rows = [("dense", to_uint8(dense.images)), (label, images), abs_diff(to_uint8(dense.images), images)]
        side_by_side(rows, args.grid)
        print(f"grid: {args.grid}")
    return 0


def image_paths(out: str, n: int) -> list[str]:
    """Where ``generate`` writes ``n`` images: ``out`` for one, ``<stem>-<i><ext>`` for several."""
    if n == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext}" for i in range(n)]


def cmd_plan_show(args) -> int:
    png = args.png or os.path.splitext(args.plan)[0] + ".png"
    check_out_file("--png", png, image=True)
    plan = Plan.load(args.plan)
    print(plan.summary())
    plot_plan(plan, png)
    print(f"heat map: {png}")
    if args.json:
        print(json.dumps(plan.counts()))
    return 0


def cmd_eval(args) -> int:
    device = check_device(args.device)  # every check before any work
    dtype = check_dtype(args.dtype, device)
    check_out_file("--json", args.json)
    check_out_file("--samples-png", args.samples_png, image=True)
    check_in_file("--plan", args.plan)
    root = check_weights_arg(args.weights, (args.model,))
    if args.method == "adaspa":
        try:
            method = ditaccel.AdaSpaConfig(sparsity=args.sparsity, head_adaptive=not args.no_head_adaptive,
                                           first_lse=args.first_lse)
        except ValueError as e:
            raise UsageError("--sparsity", str(e)) from None
    elif args.method == "ditfastattn" and args.plan:
        method = ditaccel.Plan.load(args.plan)
        if method.num_steps != args.steps:
            raise UsageError("--steps", f"the plan {args.plan!r} was calibrated for {method.num_steps} steps but "
                                        f"this run runs {args.steps}; pass --steps {method.num_steps}")
    elif args.method == "ditfastattn":
        _check_calibration_steps(args.steps)
        method = _ditfastattn_config(args, show_progress=progress_on(args))
        print(f"calibrating: {_threshold_line(args.threshold, method)}")
    else:
        method = None
    kw = {"guidance_scale": args.guidance_scale} if args.guidance_scale is not None else {}
    if args.samples_png:
        kw["return_samples"] = True
    r = evaluate.evaluate_trained(args.model, method, weights_dir=root, device=device, n=args.samples, steps=args.steps,
                         dtype=dtype, progress=progress_bar(args), **kw)
    if args.samples_png:
        show = 24 if args.model == "image" else 4
        rows = grid_rows(r.pop("samples_dense")[:show], "dense")
        if "samples_compressed" in r:
            rows += grid_rows(r.pop("samples_compressed")[:show], args.method)
        side_by_side(rows, args.samples_png, scale=2)
        print(f"samples: {args.samples_png}")
    shown = {k: v for k, v in r.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    width = max(len(k) for k in shown)
    for k, v in shown.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        out = {k: v for k, v in r.items() if not torch.is_tensor(v)}  # no samples/features
        out.update(model=args.model, dtype=args.dtype, weights=str(root), env=environment(str(device)))
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


# ------------------------------------------------------------------------------ parser


def _threshold(text: str):
    """δ: a float >= 0 or a preset D1..D6."""
    if text in PRESETS:
        return text
    try:
        return float_in(0.0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a float >= 0 nor a preset "
                                         f"{', '.join(sorted(PRESETS))}") from None


def _model_args(p, default="demo-dit"):
    p.add_argument("--model", default=default,
                   help=f"a diffusers pipeline id/path, or a built-in offline model: {', '.join(TINY_MODELS)} "
                        "(testbed: trained, shipped; the others: random weights)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on CUDA, float32 elsewhere")


def build_parser() -> argparse.ArgumentParser:
    """The whole ``ditaccel`` command tree (every tool module mounts its own options here)."""
    ap = Parser(prog="ditaccel", description="Faster Diffusion Transformers without retraining.",
                 formatter_class=HelpWithDefaults)
    ap.add_argument("--version", action="version", version=f"ditaccel {__version__}")
    ap.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    sub = subcommands(ap, "command", "COMMAND")

    p = subcommand(sub, "demo", help="generate dense and compressed side by side with the shipped (or a fresh) "
                   "plan, report", progress=True, func=cmd_demo)
    _model_args(p, default="testbed")
    p.add_argument("--steps", type=POSITIVE, default=10, help="denoising steps (2 or more)")
    p.add_argument("--threshold", type=_threshold, default="D2", help="δ (float) or a preset D1..D6")
    p.add_argument("--window", default="band1d", choices=["band1d", "neighborhood2d"], help="window attention kind")
    p.add_argument("--calibration-inputs", type=POSITIVE, default=4, help="class labels/captions to calibrate on")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate even when the shipped testbed plan fits these settings (minutes on CPU; "
                        "other settings or models always calibrate)")
    p.add_argument("--samples", type=POSITIVE, default=2, help="images generated dense and compressed")
    p.add_argument("--out", default="ditaccel-demo",
                   help="output folder (created if missing; its parent must exist)")

    p = subcommand(sub, "calibrate", help="search a DiTFastAttn plan and save it as JSON", progress=True,
                   func=cmd_calibrate)
    _model_args(p)
    p.add_argument("--steps", type=POSITIVE, default=20, help="denoising steps the plan is for (2 or more)")
    p.add_argument("--threshold", type=_threshold, default="0.1", help="δ (float) or a preset D1..D6")
    p.add_argument("--window", default="band1d", choices=list(WINDOW_KINDS),
                   help="window attention kind (neighborhood3d: a box over frames, rows and columns; on images the "
                        "2D box)")
    p.add_argument("--window-size", type=float_in(0.0, 1.0, low_open=True), default=0.25,
                   help="window size, a fraction of the tokens in (0, 1]")
    p.add_argument("--search", default="greedy", choices=["greedy", "local"],
                   help="greedy: the paper's search; local: per-layer scores + end-to-end binary search (faster)")
    p.add_argument("--residual-refresh", default="full", choices=list(RESIDUAL_REFRESHES),
                   help="which steps refresh the window residual that wars steps add: full steps only, or also asc "
                        "steps (full+asc, as thu-nics/DiTFastAttn's code)")
    p.add_argument("--cache-dtype", default="model", choices=list(CACHE_DTYPES),
                   help="how the plan stores its caches between steps: model (the model's dtype) or float8 (e4m3 "
                   "with per-head scales: about half the memory of bf16); the search runs with them (default: model)")
    p.add_argument("--prompt", action="append", help="calibration caption (repeat); default: 6 built-in")
    p.add_argument("--class-labels", type=SEED, nargs="+", help="DiT class ids; default: 8 spread ids")
    p.add_argument("--guidance-scale", type=GUIDANCE, help="default: the pipeline's")
    p.add_argument("--seed", type=SEED, default=0, help="calibration noise seed")
    p.add_argument("--out", default="plan.json", help="plan file to write (its folder must exist)")

    p = subcommand(sub, "generate", help="generate with (or without) a plan", progress=True, func=cmd_generate)
    _model_args(p)
    p.add_argument("--plan", help="plan file from `ditaccel calibrate` (default: none, dense attention)")
    p.add_argument("--steps", type=POSITIVE, help="default: the plan's step count, or 20 without a plan")
    p.add_argument("--prompt", action="append", help="caption (repeat for several images); default: a built-in one")
    p.add_argument("--class-labels", type=SEED, nargs="+", help="DiT class ids; default: one built-in id")
    p.add_argument("--guidance-scale", type=GUIDANCE, help="default: the pipeline's")
    p.add_argument("--seed", type=SEED, default=0, help="noise seed")
    p.add_argument("--out", default="image.png",
                   help="the generated image (its folder must exist); several images: OUT-0.png, OUT-1.png, ...")
    p.add_argument("--grid", help="also write a labelled grid here: dense and, with --plan, the compressed images "
                   "and their difference (generates dense too; default: no grid)")

    p = subcommand(sub, "eval", help="quality and speed of a method against dense on a trained testbed model",
                   progress=True, func=cmd_eval)
    p.add_argument("--model", default="image", choices=["image", "video"], help="which trained testbed")
    p.add_argument("--method", default="adaspa", choices=["adaspa", "ditfastattn", "dense"], help="method to evaluate")
    p.add_argument("--sparsity", type=float_in(0.0, 1.0), default=0.8,
                   help="adaspa: fraction of key blocks dropped")
    p.add_argument("--no-head-adaptive", action="store_true", help="adaspa: one sparsity for every head")
    p.add_argument("--first-lse", default="fresh", choices=["fresh", "previous"],
                   help="adaspa: where the first search's LSE comes from (AdaSpaConfig.first_lse; default: the paper's)")
    p.add_argument("--threshold", type=_threshold, default="D4", help="ditfastattn: δ (float) or a preset D1..D6")
    p.add_argument("--plan", help="ditfastattn: a plan file instead of calibrating (default: calibrate)")
    p.add_argument("--samples", type=POSITIVE, default=16, help="samples generated per variant")
    p.add_argument("--steps", type=POSITIVE, default=20, help="denoising steps")
    p.add_argument("--guidance-scale", type=GUIDANCE, help="default: the testbed pipeline's")
    p.add_argument("--weights", help="folder with image/, video/ and the classifiers (default: shipped)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="generator dtype (the classifier always runs in float32)")
    p.add_argument("--json", help="also write the metrics here (its folder must exist; default: none)")
    p.add_argument("--samples-png", help="also write a grid of the first samples (dense, then the method) here (default: none)")

    p = subcommand(sub, "plan", help="inspect plan files")
    s = subcommand(subcommands(p, "plan_command", "COMMAND"), "show",
                   help="print a summary and write a heat map PNG", func=cmd_plan_show)
    s.add_argument("plan", help="plan file")
    s.add_argument("--png", help="heat map path (default: next to the plan)")
    s.add_argument("--json", action="store_true", help="also print method counts as JSON")

    bench.add_arguments(subcommand(sub, "bench", help="speed of attention kernels and full-size architectures "
                                   "(random weights)", description=bench.DESCRIPTION))
    quality.add_arguments(subcommand(sub, "quality", help="the quality tables of QUALITY.md on the trained testbed",
                                     description=quality.DESCRIPTION, progress=True, func=quality.run))
    worth.add_arguments(subcommand(sub, "worth", help="each method against fewer steps and diffusers' caches at "
                                   "equal cost", description=worth.DESCRIPTION, progress=True, func=worth.run))
    p = subcommand(sub, "testbed", help="train the testbed models (shipped trained in the package)")
    train.add_arguments(subcommand(subcommands(p, "testbed_command", "COMMAND"), "train",
                                   help=train.HELP))
    return ap


def main(argv: list[str] | None = None) -> int:
    """``ditaccel ...``: 0 on success (and for --help, --version), 2 on a user error (one line on
    stderr; ``--debug``: the traceback), other codes as each command says."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    return run_parser(build_parser(), sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
