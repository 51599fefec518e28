"""Training of the testbed models on procedural data (``ditaccel.testbed.data``): the ``ditaccel
testbed train`` command, and the training API in one place.

Three entry points, each with a wall-clock budget (stop at the budget, save what is there):

* ``train_image(out_dir, ...)``: the pixel-space image DiT (``image_training``), saved as a
  ``PixelDiTPipeline`` folder.
* ``train_video(out_dir, ...)``: the pixel-space video CogVideoX and its tiny T5 text encoder
  (``video_training``), saved as a ``PixelCogVideoXPipeline`` folder.
* ``train_classifiers(out_dir, ...)``: the image and video classifiers (``classifier_training``),
  saved to ``out_dir/image_classifier`` and ``out_dir/video_classifier``.

The recipes are in ``recipes``, the machinery they share (schedule, EMA, budget, loop, probe) in
``training``, initialisation and saving in ``checkpoint``.

Command line: ``ditaccel testbed train image|video|classifiers [--out DIR] [--minutes M] [--seed S]
[--steps N] [--device D] [--toy]`` (``scripts/train_testbed.sh`` is how the shipped weights were made);
``python -m ditaccel.testbed.train ...`` is the same command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..cli_support import (
    POSITIVE,
    SEED,
    UsageError,
    check_device,
    float_in,
    progress_on,
    subcommand,
    subcommands,
    tool_main,
)
from .checkpoint import weights_bytes
from .classifier_training import train_classifiers
from .image_training import build_image_transformer, train_image
from .pixel import WEIGHTS_DIR
from .recipes import CLASSIFIER_RECIPE, IMAGE_RECIPE, VIDEO_RECIPE
from .training import SDPA_BACKENDS
from .video_training import build_video_components, train_video

__all__ = [
    "IMAGE_RECIPE",
    "VIDEO_RECIPE",
    "CLASSIFIER_RECIPE",
    "build_image_transformer",
    "build_video_components",
    "weights_bytes",
    "train_classifiers",
    "train_image",
    "train_video",
]


#: the ``ditaccel testbed train`` line of ``ditaccel testbed --help``
HELP = "train a testbed model on procedural data (image, video, classifiers)"


def add_arguments(parser) -> None:
    """Mount ``image``, ``video`` and ``classifiers`` as subcommands of ``parser`` (the ``ditaccel
    testbed train`` parser of ``ditaccel.cli``), each with only the options it takes."""
    sub = subcommands(parser, "what", "WHAT")
    minutes = float_in(0.0, low_open=True)

    def common(name, help, default_minutes, out_help):
        p = subcommand(sub, name, help=help, progress=True, func=run)
        p.add_argument("--out", help=out_help)
        p.add_argument("--minutes", type=minutes, default=default_minutes, help="time budget")
        p.add_argument("--seed", type=SEED, default=0, help="initialisation, data and noise seed")
        p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1")
        p.add_argument("--toy", action="store_true", help="tiny sizes for a CPU smoke test")
        return p

    def generator(p):
        p.add_argument("--steps", type=POSITIVE, help="the LR schedule's step count (default: fitted to --minutes)")
        p.add_argument("--init", help="continue from the weights of a folder this command wrote (default: a fresh "
                       "initialisation)")
        p.add_argument("--probe-every", type=minutes, help="score the EMA weights' samples every M minutes and at the "
                       "end (needs --probe-classifier; default: no learning curve)")
        p.add_argument("--probe-classifier", help="the classifier folder for --probe-every (default: none)")
        p.add_argument("--probe-samples", type=POSITIVE, default=48, help="samples per probe")
        p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                       help="torch.compile the transformer (auto: on CUDA)")

    weights = "the package's weights folder, where `ditaccel eval` and the demo look"
    p = common("image", "the pixel-space image DiT", 15.0, f"output folder (default: {weights}, image/)")
    generator(p)
    p.add_argument("--prediction-type", choices=["v_prediction", "epsilon"], help="the training target (default: the "
                   "recipe's)")

    p = common("video", "the pixel-space video CogVideoX", 18.0, f"output folder (default: {weights}, video/)")
    generator(p)
    p.add_argument("--qk-norm-init", type=float, help="initial q/k LayerNorm weight (default: the recipe's)")
    p.add_argument("--heads", type=POSITIVE, help="attention heads (default: the config's; the head dim is "
                   "width / heads)")
    p.add_argument("--layers", type=POSITIVE, help="transformer blocks (default: the config's 6)")
    p.add_argument("--width", type=POSITIVE, help="attention width, heads x head dim, a multiple of 16 (default: "
                   "the config's 192)")
    p.add_argument("--rope", action="store_true", help="3D rotary position embeddings (CogVideoX 5b layout) "
                   "instead of the 2b sin-cos table")
    p.add_argument("--attention-backend", choices=list(SDPA_BACKENDS),
                   help="the SDPA backend tried first while training (default: PyTorch's order)")

    p = common("classifiers", "the image and video classifiers", 4.0, f"the parent folder of image_classifier/ and "
               f"video_classifier/ (default: {weights})")
    p.add_argument("--steps", type=POSITIVE, help="steps of each classifier (default: the recipe's)")
    p.add_argument("--only", choices=["image", "video"], help="train only this one (default: both)")


def _check_args(a) -> None:
    """Paths and option combinations, before any model is built: one-line ``UsageError``s."""
    check_device(a.device)
    if a.out is not None:  # created with its parents (a weights tree), so only: a folder, somewhere writable
        out = Path(a.out).absolute()
        if out.exists() and not out.is_dir():
            raise UsageError("--out", f"{a.out!r} exists and is not a folder")
        existing = next(p for p in (out, *out.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UsageError("--out", f"cannot create {a.out!r}: {str(existing)!r} is not a writable folder")
    if a.what == "classifiers":
        return
    if a.init is not None and not (Path(a.init) / "transformer" / "config.json").is_file():
        raise UsageError("--init", f"{a.init!r} is not a folder written by `ditaccel testbed train {a.what}` "
                                   "(no transformer/config.json)")
    if a.probe_every is not None and a.probe_classifier is None:
        raise UsageError("--probe-every", "needs --probe-classifier (a trained classifier folder)")
    if a.probe_classifier is not None:
        if a.probe_every is None:
            raise UsageError("--probe-classifier", "only with --probe-every")
        if not (Path(a.probe_classifier) / "config.json").is_file():
            raise UsageError("--probe-classifier", f"{a.probe_classifier!r} is not a classifier folder (no "
                                                   "config.json); train one with `ditaccel testbed train classifiers`")
    if a.what == "video" and a.width is not None and a.width % 16:
        raise UsageError("--width", f"must be a multiple of 16 (CogVideoX's 3D sin-cos embedding), got {a.width}")
    if a.what == "video" and a.heads is not None and a.width is not None and a.width % a.heads:
        raise UsageError("--heads", f"must divide the width {a.width}, got {a.heads}")


def run(a) -> int:
    """``ditaccel testbed train image|video|classifiers`` (parsed by ``add_arguments``): prints the
    training info as JSON; bad arguments raise ``ValueError`` before any model is built."""
    _check_args(a)
    kw = dict(seed=a.seed, device=a.device, toy=a.toy, steps=a.steps, progress=progress_on(a))
    out = a.out or (WEIGHTS_DIR if a.what == "classifiers" else WEIGHTS_DIR / a.what)
    if a.what != "classifiers":
        kw.update(compile={"auto": None, "on": True, "off": False}[a.compile], init_from=a.init,
                  probe_every=a.probe_every, probe_classifier=a.probe_classifier, probe_samples=a.probe_samples)
    if a.what == "image":
        info = train_image(out, minutes=a.minutes, prediction_type=a.prediction_type, **kw)
    elif a.what == "video":
        info = train_video(out, minutes=a.minutes, qk_norm_init=a.qk_norm_init, heads=a.heads, layers=a.layers,
                           width=a.width, attention_backend=a.attention_backend, rope=a.rope, **kw)
    else:
        which = (a.only,) if a.only else ("image", "video")
        info = train_classifiers(out, minutes=a.minutes, which=which, **kw)
    print(json.dumps({k: v for k, v in info.items() if k != "losses"} if "losses" in info else
                     {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in info.items()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditaccel testbed train ...`` (the same parser and errors): 0 on success, 2 on bad arguments."""
    return tool_main("testbed train", add_arguments, argv, help=HELP)


if __name__ == "__main__":
    raise SystemExit(main())
