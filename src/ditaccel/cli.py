"""The ``ditaccel`` command: demo, calibrate, generate, plan show, eval, testbed train, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time

import torch

TINY_MODELS = ("testbed", "tiny-dit", "tiny-pixart", "demo-dit", "demo-pixart")
#: the trained built-ins (real weights, shipped in the package); the others have random weights
TRAINED_MODELS = ("testbed",)


class UsageError(ValueError):
    """A user error: printed as one line ``ditaccel: error: <field>: <message>``, exit status 2."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(name: str) -> str:
    """The device ``--device`` names, checked before any work: a parseable name that this build can use."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError("--device", f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device", f"{name!r}: CUDA is not available here (torch {torch.__version__}, "
                                         f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError("--device", f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device", f"{name!r}: MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise UsageError("--device", f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError("--dtype", f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}") from None


def _check_out_file(field: str, path: str | None, image: bool = False) -> None:
    """An output file: its folder must exist (ditaccel creates the file, never the folders above it)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(field, f"{path!r} is a folder; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(field, f"folder {parent!r} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(field, f"folder {parent!r} is not writable")
    if image:
        from PIL import Image

        ext = os.path.splitext(path)[1].lower()
        if ext not in Image.registered_extensions():
            raise UsageError(field, f"{path!r}: unknown image extension {ext or '(none)'!r}; use .png")


def _check_out_dir(field: str, path: str) -> None:
    """An output folder: created if missing, but its parent must exist (no surprise folder trees)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(field, f"{path!r} exists and is not a folder")
        if not os.access(path, os.W_OK):
            raise UsageError(field, f"folder {path!r} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(field, f"folder {parent!r} (the parent of {path!r}) does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(field, f"folder {parent!r} is not writable")


def _check_in_file(field: str, path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise UsageError(field, f"no such file {path!r}")


def check_weights_arg(weights: str | None, tables: tuple[str, ...]):
    """``--weights``: the folder of trained testbed models (``quality.check_weights``), as a ``UsageError``."""
    from .quality import check_weights

    try:
        return check_weights(weights, tables)
    except ValueError as e:
        raise UsageError("--weights", str(e).removeprefix("--weights (weights_dir): ")) from None


def _ditfastattn_config(args, **kw):
    """The DiTFastAttn settings, built (and so checked) before any work."""
    import ditaccel

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
    if not _is_dit(pipe):
        raise UsageError("--class-labels", "this model takes prompts, not class labels; use --prompt")
    classes = pipe.transformer.config.num_embeds_ada_norm or 1000  # as _inputs
    bad = [c for c in labels if not 0 <= c < classes]
    if bad:
        raise UsageError("--class-labels", f"{bad} outside this model's {classes} classes (0..{classes - 1})")


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
        raise UsageError("--model", f"cannot load {model!r} ({e}). Offline built-ins: {', '.join(TINY_MODELS)}") \
            from None
    return pipe.to(device)


def _is_dit(pipe) -> bool:
    return "class_labels" in _call_params(pipe)


def _call_params(pipe):
    import inspect

    return inspect.signature(type(pipe).__call__).parameters


def _inputs(pipe, prompts: list[str] | None, labels: list[int] | None, default_n: int) -> dict:
    if _is_dit(pipe):
        if labels is None and prompts:
            try:
                labels = pipe.get_label_ids(prompts)
            except ValueError as e:  # an unknown class name: diffusers lists the known ones
                raise UsageError("--prompt", f"this class-conditional model takes class names: {e}") from None
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
    from .methods.ditfastattn import PRESETS

    threshold = PRESETS.get(args.threshold, args.threshold) if isinstance(args.threshold, str) else args.threshold
    return {"model": args.model, "steps": args.steps, "threshold": float(threshold), "window": args.window,
            "calibration_inputs": args.calibration_inputs, "seed": DEMO_CALIBRATION_SEED}


def shipped_demo_plan(args):
    """``(plan, None)`` if the shipped plan fits ``args``, else ``(None, why)``."""
    from .plan import Plan

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
    import ditaccel

    calib = _inputs(pipe, None, None, args.calibration_inputs)
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in _call_params(pipe) else {}
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

    import ditaccel
    from ditaccel.viz import abs_diff, plot_plan, side_by_side, to_uint8

    device = _device(args.device)  # every check before any work
    dtype = _dtype(args.dtype, device)
    _check_out_dir("--out", args.out)
    _check_calibration_steps(args.steps)
    cfg = _ditfastattn_config(args, window=args.window)
    plan, why = (None, "--calibrate") if args.calibrate else shipped_demo_plan(args)
    plan_is_new = plan is None
    print(f"ditaccel demo: model {args.model} on {device} ({str(dtype).replace('torch.', '')}), "
          f"{args.steps} steps, {_threshold_line(args.threshold, cfg)}")
    if not os.path.isdir(args.out):
        os.mkdir(args.out)
    pipe = load_pipeline(args.model, device, dtype)
    sample = _inputs(pipe, None, None, args.samples)
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in _call_params(pipe) else {}

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
    import ditaccel

    device = _device(args.device)  # every check before any work
    dtype = _dtype(args.dtype, device)
    _check_out_file("--out", args.out)
    _check_calibration_steps(args.steps)
    cfg = _ditfastattn_config(args, window=args.window, window_size=args.window_size, search=args.search,
                              show_progress=progress_on(args))
    print(f"calibrating {args.model}: {args.steps} steps, {_threshold_line(args.threshold, cfg)}, "
          f"search {cfg.search}, window {cfg.window}")
    pipe = load_pipeline(args.model, device, dtype)
    _check_class_labels(pipe, args.class_labels)
    kw = _inputs(pipe, args.prompt, args.class_labels, 8 if _is_dit(pipe) else 6)
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if "use_resolution_binning" in _call_params(pipe) and args.model in TINY_MODELS:
        kw["use_resolution_binning"] = False
    pipeline_progress(pipe, argparse.Namespace(progress="off"))  # the calibration's own bar counts layers
    plan = ditaccel.calibrate(pipe, cfg, num_inference_steps=args.steps, generator=_generator(device, args.seed), **kw)
    plan.save(args.out)
    print(plan.summary())
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    from PIL import Image

    import ditaccel
    from ditaccel.viz import abs_diff, side_by_side, to_uint8

    device = _device(args.device)  # every check before any work
    dtype = _dtype(args.dtype, device)
    _check_out_file("--out", args.out, image=True)
    _check_out_file("--grid", args.grid, image=True)
    _check_in_file("--plan", args.plan)
    plan = ditaccel.Plan.load(args.plan) if args.plan else None
    steps = args.steps or (plan.num_steps if plan else 20)
    if plan is not None and steps != plan.num_steps:
        raise UsageError("--steps", f"the plan {args.plan!r} was calibrated for {plan.num_steps} steps but this run "
                                    f"runs {steps} (num_inference_steps must match); omit --steps or calibrate "
                                    f"a plan for {steps} steps")
    pipe = load_pipeline(args.model, device, dtype)
    _check_class_labels(pipe, args.class_labels)
    kw = _inputs(pipe, args.prompt, args.class_labels, 1)
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if "use_resolution_binning" in _call_params(pipe) and args.model in TINY_MODELS:
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
    from ditaccel.plan import Plan
    from ditaccel.viz import plot_plan

    png = args.png or os.path.splitext(args.plan)[0] + ".png"
    _check_out_file("--png", png, image=True)
    plan = Plan.load(args.plan)
    print(plan.summary())
    plot_plan(plan, png)
    print(f"heat map: {png}")
    if args.json:
        print(json.dumps(plan.counts()))
    return 0


def cmd_eval(args) -> int:
    import ditaccel
    from ditaccel.evaluate import evaluate_trained

    device = _device(args.device)  # every check before any work
    dtype = _dtype(args.dtype, device)
    _check_out_file("--json", args.json)
    _check_out_file("--samples-png", args.samples_png, image=True)
    _check_in_file("--plan", args.plan)
    root = check_weights_arg(args.weights, (args.model,))
    if args.method == "adaspa":
        try:
            method = ditaccel.AdaSpaConfig(sparsity=args.sparsity, head_adaptive=not args.no_head_adaptive)
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
    r = evaluate_trained(args.model, method, weights_dir=root, device=device, n=args.samples, steps=args.steps,
                         dtype=dtype, progress=progress_bar(args), **kw)
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


# ------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``ditaccel: error: <field>: ...`` (exit 2), without the usage block.

    Every parser of the tree is one of these (subparsers inherit the class). ``siblings`` (set by
    ``subcommand``) are the other parsers of the same command level, so that an option given to
    the wrong mode says which modes take it."""

    siblings: dict | None = None

    def error(self, message):
        m = re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message)
        if m:
            raise UsageError(m.group(1), m.group(2))
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            raise self.unknown_argument(m.group(1))
        m = re.match(r"the following arguments are required: (.*)", message)
        if m:
            raise UsageError(m.group(1), f"required (see `{self.prog} -h`)")
        m = re.match(r"ambiguous option: (\S+?)(?:=\S*)? could match (.*)", message)
        if m:
            raise UsageError(m.group(1), f"ambiguous, could be {m.group(2)}")
        raise UsageError(self.prog, message)

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # name the subcommand that got them, not the top-level parser
            raise (getattr(ns, "_leaf", None) or self).unknown_argument(extras[0])
        return ns

    def unknown_argument(self, arg: str) -> UsageError:
        option = arg.split("=", 1)[0]
        if option.startswith("-") and len(option) > 1 and not re.fullmatch(r"-[\d.]+", option):
            takes = [name for name, p in (self.siblings or {}).items()
                     if p is not self and option in p._option_string_actions]
            if takes:
                return UsageError(option, f"not an option of `{self.prog}` (only of: {', '.join(takes)})")
            return UsageError(option, f"unknown option (see `{self.prog} -h`)")
        return UsageError(repr(arg), f"unexpected argument (see `{self.prog} -h`)")


class _Help(argparse.HelpFormatter):
    """Every option's default in ``--help`` (options whose default is None say what happens in their help)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or "default:" in h or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def subcommand(sub, name: str, *, help: str, description: str | None = None, progress: bool = False,
               func=None) -> _Parser:
    """A subcommand parser of the ``ditaccel`` tree under ``sub`` (an ``add_subparsers`` action).

    Every subcommand takes ``--debug`` (a traceback instead of the one-line error); ``progress``:
    also ``--progress auto|on|off``. ``func(args) -> int`` runs it."""
    p = sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                       formatter_class=_Help)
    p.siblings = sub.choices
    p.set_defaults(_leaf=p)
    if func is not None:
        p.set_defaults(func=func)
    if progress:
        p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                       help="progress bars on stderr; auto: only when stderr is a terminal")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, show the traceback instead of one line")
    return p


def subcommands(parser: _Parser, dest: str, metavar: str):
    """The subparsers action of ``parser`` (required, named ``metavar`` in errors)."""
    return parser.add_subparsers(dest=dest, required=True, metavar=metavar, parser_class=_Parser)


def progress_on(args) -> bool:
    """Whether this run shows progress bars: ``--progress on``, or ``auto`` with stderr a terminal."""
    mode = getattr(args, "progress", "auto")
    if mode == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return mode == "on"


def progress_bar(args):
    """A ``tqdm`` factory for one phase's bar (on stderr), or None when progress is off. The library
    takes it as its ``progress`` argument (it never imports the command line)."""
    if not progress_on(args):
        return None
    import functools

    from tqdm import tqdm

    return functools.partial(tqdm, file=sys.stderr, dynamic_ncols=True, leave=False)


def pipeline_progress(pipe, args, desc: str | None = None) -> None:
    """Show (or hide) the pipeline's own per-step bar (diffusers' ``set_progress_bar_config``)."""
    if hasattr(pipe, "set_progress_bar_config"):
        on = progress_on(args)
        pipe.set_progress_bar_config(disable=not on, file=sys.stderr, leave=False, dynamic_ncols=True,
                                     **({"desc": desc} if desc else {}))


def printer(args):
    """``print`` for result lines while bars may be on screen (``tqdm.write`` keeps them intact)."""
    if not progress_on(args):
        return print
    from tqdm import tqdm

    return lambda line: tqdm.write(str(line), file=sys.stdout)


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


def float_in(low: float, high: float | None = None, *, low_open: bool = False):
    import math

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v) or (v <= low if low_open else v < low) or (high is not None and v > high):
            span = f"({low}, {high}]" if low_open else (f"[{low}, {high}]" if high is not None else f">= {low}")
            if high is None and low_open:
                span = f"> {low}"
            raise argparse.ArgumentTypeError(f"must be {'in ' if high is not None else ''}{span}, got {text}")
        return v

    parse.__name__ = "float"
    return parse



def _threshold(text: str):
    """δ: a float >= 0 or a preset D1..D6."""
    from .methods.ditfastattn import PRESETS

    if text in PRESETS:
        return text
    try:
        return float_in(0.0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a float >= 0 nor a preset "
                                         f"{', '.join(sorted(PRESETS))}") from None


POSITIVE = int_at_least(1)
SEED = int_at_least(0)
GUIDANCE = float_in(0.0)


def _model_args(p, default="demo-dit"):
    p.add_argument("--model", default=default,
                   help=f"a diffusers pipeline id/path, or a built-in offline model: {', '.join(TINY_MODELS)} "
                        "(testbed: trained, shipped; the others: random weights)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on CUDA, float32 elsewhere")


def build_parser() -> argparse.ArgumentParser:
    """The whole ``ditaccel`` command tree (every tool module mounts its own options here)."""
    from . import __version__, bench, quality, worth
    from .testbed import train

    ap = _Parser(prog="ditaccel", description="Faster Diffusion Transformers without retraining.",
                 formatter_class=_Help)
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
    p.add_argument("--window", default="band1d", choices=["band1d", "neighborhood2d"], help="window attention kind")
    p.add_argument("--window-size", type=float_in(0.0, 1.0, low_open=True), default=0.25,
                   help="window size, a fraction of the tokens in (0, 1]")
    p.add_argument("--search", default="greedy", choices=["greedy", "local"],
                   help="greedy: the paper's search; local: per-layer scores + end-to-end binary search (faster)")
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
                                   help="train a testbed model on procedural data (image, video, classifiers)"))
    return ap


def main(argv: list[str] | None = None) -> int:
    """``ditaccel ...``: 0 on success (and for --help, --version), 2 on a user error (one line on
    stderr; ``--debug``: the traceback), other codes as each command says."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        return args.func(args)
    except ValueError as e:  # bad input (UsageError, PlanError): one clear line, no traceback
        if getattr(args, "debug", "--debug" in argv):
            raise
        print("ditaccel: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
