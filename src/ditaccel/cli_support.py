"""What every command-line tool shares (``ditaccel.cli``, ``bench``, ``quality``, ``worth``,
``testbed.train``): usage errors (``UsageError``), argument types (``positive_int``, ``float_in``,
...) and checks (``check_device``, ``check_dtype``, ``check_out_file``, ...), the parser classes
(``Parser``, ``HelpWithDefaults``) and ``subcommand``, progress bars, built-in pipelines by name and
their default inputs (``load_pipeline``, ``pipeline_inputs``), and ``run_parser`` (the one error
style). Every name the tools use is public; it imports no tool: every tool imports it, and
``ditaccel.cli`` mounts the tools.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import os
import re
import sys

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm import tqdm

from . import testbed
from .testbed.pixel import load_image_pipeline

TINY_MODELS = ("testbed", "tiny-dit", "tiny-pixart", "demo-dit", "demo-pixart")


#: the trained built-ins (real weights, shipped in the package); the others have random weights
TRAINED_MODELS = ("testbed",)


class UsageError(ValueError):
    """A user error: printed as one line ``ditaccel: error: <field>: <message>``, exit status 2."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(name: str) -> str:
    """The device ``--device`` names, checked before any work: a parseable name that this build can
    use, returned as given (``auto``: resolved to ``cuda`` or ``cpu``)."""
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


def check_dtype(name: str, device: str) -> torch.dtype:
    """The dtype ``--dtype`` names (``auto``: bfloat16 on CUDA, float32 elsewhere)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError("--dtype", f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}") from None


def check_out_file(field: str, path: str | None, image: bool = False) -> None:
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
        ext = os.path.splitext(path)[1].lower()
        if ext not in Image.registered_extensions():
            raise UsageError(field, f"{path!r}: unknown image extension {ext or '(none)'!r}; use .png")


def check_out_dir(field: str, path: str) -> None:
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


def check_in_file(field: str, path: str | None) -> None:
    """An input file: it must exist."""
    if path is not None and not os.path.isfile(path):
        raise UsageError(field, f"no such file {path!r}")


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    """A built-in offline model (``tiny-dit``, ``demo-pixart``, ...) or ``DiffusionPipeline.from_pretrained``."""
    builders = {"tiny-dit": testbed.tiny_dit_pipeline, "tiny-pixart": testbed.tiny_pixart_sigma_pipeline,
                "demo-dit": testbed.demo_dit_pipeline, "demo-pixart": testbed.demo_pixart_sigma_pipeline}
    if model in builders:
        return builders[model](dtype=dtype, device=device)
    if model == "testbed":
        return load_image_pipeline(dtype=dtype, device=device)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UsageError("--model", f"cannot load {model!r} ({e}). Offline built-ins: {', '.join(TINY_MODELS)}") \
            from None
    return pipe.to(device)


def is_class_conditional(pipe) -> bool:
    """Whether the pipeline is conditioned on class labels (DiT) rather than on prompts."""
    return "class_labels" in call_params(pipe)


def call_params(pipe):
    """The parameters of the pipeline's ``__call__`` (to pass only the arguments it takes)."""
    return inspect.signature(type(pipe).__call__).parameters


def pipeline_inputs(pipe, prompts: list[str] | None, labels: list[int] | None, default_n: int) -> dict:
    """The conditioning arguments of a pipeline call: ``class_labels`` (given, from class names in
    ``prompts``, or ``default_n`` distinct classes) or ``prompt`` (given, or ``default_n`` captions)."""
    if is_class_conditional(pipe):
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
    params = call_params(pipe)
    if "clean_caption" in params:
        kw["clean_caption"] = False
    return kw


DEFAULT_CAPTIONS = [
    "a red circle on a blue background", "a green square next to a yellow triangle",
    "a white cat sitting on a wooden table", "a sunset over the sea with orange clouds",
    "a city street at night with neon lights", "a bowl of fruit on a kitchen counter",
]


def psnr(a, b) -> float:
    """PSNR (dB) between two uint8 image arrays."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


class Parser(argparse.ArgumentParser):
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


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's default in ``--help`` (options whose default is None say what happens in their help)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or "default:" in h or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def subcommand(sub, name: str, *, help: str, description: str | None = None, progress: bool = False,
               func=None) -> Parser:
    """A subcommand parser of the ``ditaccel`` tree under ``sub`` (an ``add_subparsers`` action).

    Every subcommand takes ``--debug`` (a traceback instead of the one-line error); ``progress``:
    also ``--progress auto|on|off``. ``func(args) -> int`` runs it."""
    p = sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                       formatter_class=HelpWithDefaults)
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


def subcommands(parser: Parser, dest: str, metavar: str):
    """The subparsers action of ``parser`` (required, named ``metavar`` in errors)."""
    return parser.add_subparsers(dest=dest, required=True, metavar=metavar, parser_class=Parser)


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


POSITIVE = int_at_least(1)


SEED = int_at_least(0)


GUIDANCE = float_in(0.0)


#: dtypes of the measuring tools (bench, quality, worth), in the order their ``--dtype`` choices list them
TOOL_DTYPES = {name: DTYPES[name] for name in ("bfloat16", "float16", "float32")}


def positive_int(text: str) -> int:
    """The measuring tools' positive-integer argument type ("must be a positive integer, got ...")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def default_device() -> str:
    """``cuda`` if available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_parser(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parse ``argv`` and run the chosen command's ``func``: 0 on success (and for --help,
    --version), 2 on a user error (one line on stderr; ``--debug``: the traceback), other codes as
    each command says. The one error style of ``ditaccel`` and of ``python -m ditaccel.<tool>``."""
    args = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        return args.func(args)
    except ValueError as e:  # bad input (UsageError, PlanError): one clear line, no traceback
        if getattr(args, "debug", "--debug" in argv):
            raise
        print("ditaccel: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 2


def tool_main(name: str, add_arguments, argv: list[str] | None, *, help: str | None = None,
              description: str | None = None, progress: bool = False, func=None) -> int:
    """``python -m ditaccel.<tool> ARGS``: the subcommand ``ditaccel NAME`` (``"testbed train"``:
    nested) alone, with the same options (``add_arguments``), errors and exit codes as
    ``ditaccel NAME ARGS``."""
    *outer, last = name.split()
    parser = top = Parser(prog="ditaccel", formatter_class=HelpWithDefaults)
    for word in outer:
        parser = subcommand(subcommands(parser, f"{word}_parent", "COMMAND"), word, help=word)
    p = subcommand(subcommands(parser, "command", "COMMAND"), last, help=help or last, description=description,
                   progress=progress, func=func)
    add_arguments(p)
    return run_parser(top, [*name.split(), *(sys.argv[1:] if argv is None else argv)])
