"""The ``ditaccel`` command: demo, calibrate, generate, plan show, eval, testbed train, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

TINY_MODELS = ("testbed", "tiny-dit", "tiny-pixart", "demo-dit", "demo-pixart")
#: the trained built-ins (real weights, shipped in the package); the others have random weights
TRAINED_MODELS = ("testbed",)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise SystemExit(f"--dtype: unknown dtype {name!r}") from None


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    """A built-in offline model (``tiny-dit``, ``demo-pixart``, ...) or ``DiffusionPipeline.from_pretrained``."""
    from . import testbed

    builders = {"tiny-dit": testbed.tiny_dit_pipeline, "tiny-pixart": testbed.tiny_pixart_sigma_pipeline,
                "demo-dit": testbed.demo_dit_pipeline, "demo-pixart": testbed.demo_pixart_sigma_pipeline}
    if model in builders:
        return builders[model](dtype=dtype, device=device)
    if model == "testbed":
        from .testbed.pixel import load_image_pipeline

        return load_image_pipeline(dtype=dtype, device=device)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model: cannot load {model!r} ({e}). Offline built-ins: {', '.join(TINY_MODELS)}") from None
    return pipe.to(device)


def _is_dit(pipe) -> bool:
    return "class_labels" in _call_params(pipe)


def _call_params(pipe):
    import inspect

    return inspect.signature(type(pipe).__call__).parameters


def _inputs(pipe, prompts: list[str] | None, labels: list[int] | None, default_n: int) -> dict:
    if _is_dit(pipe):
        if labels is None and prompts:
            labels = pipe.get_label_ids(prompts)
        classes = pipe.transformer.config.num_embeds_ada_norm or 1000
        spread = 97 if classes == 1000 else 5  # distinct classes, spread over the label space
        return {"class_labels": labels or [i * spread % classes for i in range(1, default_n + 1)]}
    prompts = prompts or DEFAULT_CAPTIONS[:default_n]
    kw = {"prompt": prompts}
    params = _call_params(pipe)
    if "clean_caption" in params:
        kw["clean_caption"] = False
    return kw


DEFAULT_CAPTIONS = [
    "a red circle on a blue background", "a green square next to a yellow triangle",
    "a white cat sitting on a wooden table", "a sunset over the sea with orange clouds",
    "a city street at night with neon lights", "a bowl of fruit on a kitchen counter",
]


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


def psnr(a, b) -> float:
    """PSNR (dB) between two uint8 image arrays."""
    import numpy as np

    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


# ------------------------------------------------------------------------------ commands
def cmd_demo(args) -> int:
    import numpy as np

    import ditaccel
    from ditaccel.viz import abs_diff, plot_plan, side_by_side, to_uint8

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    os.makedirs(args.out, exist_ok=True)
    print(f"ditaccel demo: model {args.model} on {device} ({str(dtype).replace('torch.', '')}), "
          f"{args.steps} steps, threshold {args.threshold}")
    pipe = load_pipeline(args.model, device, dtype)
    calib = _inputs(pipe, None, None, args.calibration_inputs)
    sample = _inputs(pipe, None, None, args.samples)
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in _call_params(pipe) else {}

    t0 = time.perf_counter()
    plan = ditaccel.calibrate(pipe, ditaccel.DiTFastAttnConfig(threshold=args.threshold, window=args.window),
                              num_inference_steps=args.steps, generator=_generator(device, 1), **calib, **extra)
    print(f"calibrated in {time.perf_counter() - t0:.1f} s on {len(next(iter(calib.values())))} inputs")
    plan_path = os.path.join(args.out, "plan.json")
    plan.save(plan_path)
    plot_plan(plan, os.path.join(args.out, "plan.png"))
    print(plan.summary())

    run = dict(num_inference_steps=args.steps, output_type="np", **sample, **extra)
    _timed(pipe, device, generator=_generator(device, 0), **run)  # warm-up
    dense, t_dense = _timed(pipe, device, generator=_generator(device, 0), **run)
    ditaccel.apply(pipe, plan)
    try:
        _timed(pipe, device, generator=_generator(device, 0), **run)  # warm-up
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
    print(f"  wrote {grid_path}, {plan_path}, {os.path.join(args.out, 'plan.png')}")
    if args.model in TRAINED_MODELS:
        print("  note: the testbed is a small pixel-space DiT trained on procedural shapes (ditaccel.testbed); "
              "its quality tables are in QUALITY.md")
    elif args.model.startswith(("tiny-", "demo-")):
        print("  note: built-in models have random weights: images are noise, the numbers are what to read")
    return 0


def cmd_calibrate(args) -> int:
    import ditaccel

    device = _device(args.device)
    pipe = load_pipeline(args.model, device, _dtype(args.dtype, device))
    kw = _inputs(pipe, args.prompt, args.class_labels, 8 if _is_dit(pipe) else 6)
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if "use_resolution_binning" in _call_params(pipe) and args.model in TINY_MODELS:
        kw["use_resolution_binning"] = False
    cfg = ditaccel.DiTFastAttnConfig(threshold=args.threshold, window=args.window, window_size=args.window_size,
                                     search=args.search)
    plan = ditaccel.calibrate(pipe, cfg, num_inference_steps=args.steps, generator=_generator(device, args.seed), **kw)
    plan.save(args.out)
    print(plan.summary())
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    import ditaccel
    from ditaccel.viz import side_by_side, to_uint8

    device = _device(args.device)
    pipe = load_pipeline(args.model, device, _dtype(args.dtype, device))
    plan = ditaccel.Plan.load(args.plan) if args.plan else None
    kw = _inputs(pipe, args.prompt, args.class_labels, 1)
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if "use_resolution_binning" in _call_params(pipe) and args.model in TINY_MODELS:
        kw["use_resolution_binning"] = False
    steps = args.steps or (plan.num_steps if plan else 20)
    if plan is not None:
        ditaccel.apply(pipe, plan)
    try:
        out, seconds = _timed(pipe, device, num_inference_steps=steps, generator=_generator(device, args.seed),
                              output_type="np", **kw)
        side_by_side([("ditfastattn" if plan else "dense", to_uint8(out.images))], args.out, scale=1)
        print(f"generated {len(out.images)} image(s) in {seconds:.2f} s -> {args.out}")
        if plan is not None:
            print(ditaccel.stats(pipe))
    finally:
        ditaccel.remove(pipe)
    return 0


def cmd_plan_show(args) -> int:
    from ditaccel.plan import Plan
    from ditaccel.viz import plot_plan

    plan = Plan.load(args.plan)
    print(plan.summary())
    png = args.png or os.path.splitext(args.plan)[0] + ".png"
    plot_plan(plan, png)
    print(f"heat map: {png}")
    if args.json:
        print(json.dumps(plan.counts()))
    return 0


# ------------------------------------------------------------------------------ parser
def cmd_eval(args) -> int:
    import ditaccel
    from ditaccel.evaluate import evaluate_trained
    from ditaccel.quality import check_weights

    root = check_weights(args.weights, (args.model,))
    if args.method == "adaspa":
        method = ditaccel.AdaSpaConfig(sparsity=args.sparsity, head_adaptive=not args.no_head_adaptive)
    elif args.method == "ditfastattn":
        method = args.plan or ditaccel.DiTFastAttnConfig(threshold=args.threshold, show_progress=False)
    else:
        method = None
    device = _device(args.device)
    kw = {"guidance_scale": args.guidance_scale} if args.guidance_scale is not None else {}
    if args.samples_png:
        kw["return_samples"] = True
    r = evaluate_trained(args.model, method, weights_dir=root, device=device, n=args.samples, steps=args.steps,
                         dtype=_dtype(args.dtype, device), **kw)
    if args.samples_png:
        from ditaccel.viz import grid_rows, side_by_side

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
        from ditaccel.bench_report import environment

        out = {k: v for k, v in r.items() if not torch.is_tensor(v)}  # no samples/features
        out.update(model=args.model, dtype=args.dtype, weights=str(root), env=environment(str(device)))
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _model_args(p, default="demo-dit"):
    p.add_argument("--model", default=default,
                   help=f"a diffusers pipeline id/path, or a built-in offline model: {', '.join(TINY_MODELS)} "
                        f"(testbed: trained, shipped; the others: random weights) (default: {default})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ditaccel", description="Faster Diffusion Transformers without retraining.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="calibrate, generate dense and compressed side by side, report")
    _model_args(p, default="testbed")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threshold", default="D2", help="δ (float) or a preset D1..D6")
    p.add_argument("--window", default="band1d", choices=["band1d", "neighborhood2d"])
    p.add_argument("--calibration-inputs", type=int, default=4)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--out", default="ditaccel-demo", help="output folder")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("calibrate", help="search a DiTFastAttn plan and save it as JSON")
    _model_args(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threshold", default="0.1")
    p.add_argument("--window", default="band1d", choices=["band1d", "neighborhood2d"])
    p.add_argument("--window-size", type=float, default=0.25)
    p.add_argument("--search", default="greedy", choices=["greedy", "local"],
                   help="greedy: the paper's search; local: per-layer scores + end-to-end binary search (faster)")
    p.add_argument("--prompt", action="append", help="calibration caption (repeat); default: 6 built-in")
    p.add_argument("--class-labels", type=int, nargs="+", help="DiT class ids; default: 8 spread ids")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="plan.json")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("generate", help="generate with (or without) a plan")
    _model_args(p)
    p.add_argument("--plan", help="plan file from `ditaccel calibrate` (omit for dense)")
    p.add_argument("--steps", type=int, help="default: the plan's step count")
    p.add_argument("--prompt", action="append")
    p.add_argument("--class-labels", type=int, nargs="+")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="image.png")
    p.set_defaults(func=cmd_generate)

    sub.add_parser("bench", help="speed of full-size architectures (random weights): `ditaccel bench -h`",
                   add_help=False)
    sub.add_parser("testbed", help="train the testbed models: `ditaccel testbed train -h`", add_help=False)
    sub.add_parser("quality", help="the quality tables of QUALITY.md on the trained testbed: `ditaccel quality -h`",
                   add_help=False)
    sub.add_parser("worth", help="each method against fewer steps and diffusers' caches at equal cost: "
                   "`ditaccel worth -h`", add_help=False)

    p = sub.add_parser("eval", help="quality and speed of a method against dense on a trained testbed model")
    p.add_argument("--model", default="image", choices=["image", "video"])
    p.add_argument("--method", default="adaspa", choices=["adaspa", "ditfastattn", "dense"])
    p.add_argument("--sparsity", type=float, default=0.8, help="adaspa: fraction of key blocks dropped")
    p.add_argument("--no-head-adaptive", action="store_true", help="adaspa: one sparsity for every head")
    p.add_argument("--threshold", default="D4", help="ditfastattn: δ (float) or a preset D1..D6")
    p.add_argument("--plan", help="ditfastattn: a plan file instead of calibrating")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--weights", help="folder with image/, video/ and the classifiers (default: shipped)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="generator dtype (the classifier always runs in float32)")
    p.add_argument("--json", help="also write the metrics here")
    p.add_argument("--samples-png", help="also write a grid of the first samples (dense, then the method) here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plan", help="inspect plan files")
    psub = p.add_subparsers(dest="plan_command", required=True)
    s = psub.add_parser("show", help="print a summary and write a heat map PNG")
    s.add_argument("plan")
    s.add_argument("--png", help="heat map path (default: next to the plan)")
    s.add_argument("--json", action="store_true", help="also print method counts as JSON")
    s.set_defaults(func=cmd_plan_show)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["quality"]:
        from .quality import main as quality_main

        return quality_main(argv[1:])
    if argv[:1] == ["worth"]:
        from .worth import main as worth_main

        return worth_main(argv[1:])
    if argv[:2] == ["testbed", "train"]:
        from .testbed.train import main as train_main

        return train_main(argv[2:])
    if argv[:1] == ["testbed"]:
        print("ditaccel: error: testbed: the subcommand is `ditaccel testbed train image|video|classifiers`",
              file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if getattr(args, "threshold", None) is not None:
        try:
            args.threshold = float(args.threshold)
        except ValueError:
            pass  # a preset name; DiTFastAttnConfig validates
    try:
        return args.func(args)
    except ValueError as e:  # bad input (PlanError included): one clear line, no traceback
        print(f"ditaccel: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
