"""Quality tables on the trained testbed models (``ditaccel quality``): every setting against dense.

Two tables, the analogues of the papers' main tables, each measured against one dense set (the
same seeds and inputs give the same dense samples for every row, so they are generated once):

* **image** (DiTFastAttn, the paper's Table 1): the pixel-space image DiT with a plan calibrated
  per threshold D1..D6 (greedy search, 8 calibration classes), and the ablation of residual
  sharing: the same search restricted to window attention, with the residual (``wars``) and
  without it (``wa``), at D2, D4, D6.
* **video** (AdaSpa, its Table 1): the pixel-space video CogVideoX with sparsity 0.7 / 0.8 / 0.9,
  head-adaptive sparsity on/off, LSE cache on/off (12 rows).
* **video-ditfastattn** (the video analogue of DiTFastAttn's Table 1): the same video model with a
  plan calibrated per threshold D1..D6 (the paper's 1D band over the flattened frame, row, column
  order; text rows and columns dense), with our loss and with the official one.

Each table starts with a ``dense`` row: dense attention run through ditaccel (a plan of all
``full``), so its PSNR against the plain dense set (∞ when exact) and its attention FLOPs (100%)
check the measurement itself. Columns: attention FLOPs (% of dense, search passes included),
PSNR against dense (mean and the worst sample), SSIM, Fréchet distance of the classifier's
features to the procedural data and to the dense set, classifier accuracy (video: object and
motion both right), generation time and speed-up, and which methods ran.

``run_quality`` writes each table as a section of ``QUALITY.md`` (between ``bench.report``
markers, replaced on a re-run), its raw JSON, a plot of PSNR and accuracy against attention
FLOPs, and a sample grid to ``docs/results/<date>-<device>-quality-<table>{.json,.png,-samples.png}``.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bench.report import environment, jsonable, missing_matplotlib, result_stem, update_markdown, write_json
from .cli_support import (
    TOOL_DTYPES,
    UsageError,
    check_out_dir,
    check_out_file,
    default_device,
    check_device,
    positive_int,
    float_in,
    printer,
    progress_bar,
    tool_main,
)
from .evaluate import evaluate, load_trained
from .methods.adaspa import AdaSpaConfig
from .methods.ditfastattn import FULL, PRESETS, DiTFastAttnConfig
from .models import adapter_for
from .plan import Plan
from .testbed.data import VideoCaptions
from .testbed.pixel import WEIGHTS_DIR
from .viz import side_by_side, to_uint8, video_frames

__all__ = [
    "ABLATION_THRESHOLDS",
    "MIN_PSNR",
    "SPARSITIES",
    "TABLES",
    "TESTBED",
    "Setting",
    "image_settings",
    "main",
    "most_compressing",
    "run_quality",
    "run_table",
    "table_settings",
    "video_ditfastattn_settings",
    "video_settings",
]

TABLES = ("image", "video", "video-ditfastattn")
#: the trained testbed model each table runs on
TESTBED = {"image": "image", "video": "video", "video-ditfastattn": "video"}
#: the PSNR (dB, mean against dense) a setting must keep to count as "within quality"
MIN_PSNR = 30.0
#: thresholds of the residual-sharing ablation (window-only searches)
ABLATION_THRESHOLDS = ("D2", "D4", "D6")
SPARSITIES = (0.7, 0.8, 0.9)
#: rows shown next to dense in the sample grids
GRID_SETTINGS = {"image": ("D4", "D6"), "video": ("s=0.8", "s=0.9"), "video-ditfastattn": ("D2", "D4")}
GRID_SAMPLES = {"image": 6, "video": 3, "video-ditfastattn": 3}
GRID_FRAMES = 4
#: about how many pixels a sample (or frame) is wide in the grid
GRID_TILE_PX = {"image": 192, "video": 128}
#: run sizes: samples per table, denoising steps, procedural reference samples, batch, AdaSpa block size
FULL_SIZE = dict(samples_image=256, samples_video=64, steps=50, n_reference=512, batch_size=32, block_size=64)
TOY_SIZE = dict(samples_image=4, samples_video=2, steps=5, n_reference=8, batch_size=4, block_size=16)


@dataclass(frozen=True)
class Setting:
    """One row of a table.

    Attributes:
        label: unique within the table (``"D4"``, ``"D4 wa"``, ``"s=0.8 -ha"``); sample grids and
            plot annotations use it.
        group: the curve the row belongs to (``"DiTFastAttn"``, ``"wa only (no residual)"``,
            ``"AdaSpa"``, ...); ``"dense"`` for the dense row. The ≥ 30 dB pick is per group.
        columns: the values of the table's parameter columns (``TABLE_COLUMNS``).
        method: what ``evaluate`` compares with dense; ``None`` for the dense row (a plan of all
            ``full``, built for the pipeline).
    """

    label: str
    group: str
    columns: tuple[str, ...]
    method: Any = None


#: per table: its title and the names of its parameter columns
TABLE_TITLES = {"image": "Image testbed: DiTFastAttn vs dense", "video": "Video testbed: AdaSpa vs dense",
                "video-ditfastattn": "Video testbed: DiTFastAttn vs dense"}
TABLE_COLUMNS = {"image": ("setting", "δ", "candidates"), "video": ("sparsity", "head-adaptive", "LSE cache"),
                 "video-ditfastattn": ("setting", "δ", "loss")}


def image_settings(thresholds: tuple[str, ...] = tuple(PRESETS),
                   ablation_thresholds: tuple[str, ...] = ABLATION_THRESHOLDS) -> list[Setting]:
    """Dense, DiTFastAttn at each threshold (the paper's candidates), then the residual-sharing
    ablation: window-only searches with ``wars`` and with ``wa`` at each ablation threshold."""
    rows = [Setting("dense", "dense", ("dense", "—", "—"))]
    searches = [("DiTFastAttn", "", None, thresholds), ("wars only", " wars", ("wars",), ablation_thresholds),
                ("wa only (no residual)", " wa", ("wa",), ablation_thresholds)]
    for group, suffix, candidates, names in searches:
        for name in names:
            kw = {"candidates": candidates} if candidates else {}
            config = DiTFastAttnConfig(threshold=name, show_progress=False, **kw)
            shown = ", ".join(config.candidates)
            rows.append(Setting(name + suffix, group, (name + suffix, f"{config.threshold:g}", shown), config))
    return rows


def video_settings(sparsities: tuple[float, ...] = SPARSITIES,
                   block_size: int = FULL_SIZE["block_size"]) -> list[Setting]:
    """Dense, then AdaSpa at each sparsity × head-adaptive on/off × LSE cache on/off."""
    rows = [Setting("dense", "dense", ("dense", "—", "—"))]
    for s in sparsities:
        for head_adaptive in (True, False):
            for lse_cache in (True, False):
                off = [name for name, on in (("head-adaptive", head_adaptive), ("LSE cache", lse_cache)) if not on]
                group = "AdaSpa" + (f" w/o {' and '.join(off)}" if off else "")
                label = f"s={s:g}" + ("" if head_adaptive else " -ha") + ("" if lse_cache else " -lse")
                config = AdaSpaConfig(sparsity=s, head_adaptive=head_adaptive, lse_cache=lse_cache,
                                      block_size=block_size)
                rows.append(Setting(label, group, (f"{s:g}", "yes" if head_adaptive else "no",
                                                   "yes" if lse_cache else "no"), config))
    return rows


def video_ditfastattn_settings(thresholds: tuple[str, ...] = tuple(PRESETS)) -> list[Setting]:
    """Dense, then DiTFastAttn at each threshold with our search loss and with the official one
    (``DiTFastAttnConfig(loss="official")``, the signed max: it compresses less at the same δ)."""
    rows = [Setting("dense", "dense", ("dense", "—", "—"))]
    for loss, group, suffix in (("relative", "DiTFastAttn", ""), ("official", "DiTFastAttn (official loss)", " official")):
        for name in thresholds:
            config = DiTFastAttnConfig(threshold=name, loss=loss, show_progress=False)
            rows.append(Setting(name + suffix, group, (name + suffix, f"{config.threshold:g}", loss), config))
    return rows


def table_settings(which: str, block_size: int = FULL_SIZE["block_size"]) -> list[Setting]:
    """The default rows of table ``which``."""
    if which == "image":
        return image_settings()
    if which == "video":
        return video_settings(block_size=block_size)
    return video_ditfastattn_settings()


# ------------------------------------------------------------------------------ measuring
def _all_full_plan(pipe, steps: int):
    n_layers = len(adapter_for(pipe.transformer).attention_modules(pipe.transformer))
    return Plan.from_methods(pipe, [[FULL] * steps for _ in range(n_layers)], cfg=True)


def default_guidance(pipe) -> float:
    return float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)


def table_inputs(pipe, which: str, n: int) -> list:
    """Class ids ``i % classes`` (image) or balanced captions (video), as ``evaluate``'s defaults."""
    if TESTBED[which] == "image":
        return [i % pipe.transformer.config.num_embeds_ada_norm for i in range(n)]
    return VideoCaptions.captions(VideoCaptions().balanced_labels(n, 0))


def _row(setting: Setting, r: dict) -> dict:
    row = {"label": setting.label, "group": setting.group, "columns": list(setting.columns),
           "method": r["method"], "attention_flops_ratio": r["attention_flops_ratio"], "psnr": r["psnr"],
           "psnr_min": r["psnr_min"], "ssim": r["ssim"], "ssim_min": r["ssim_min"], "fd_data": r["fd_compressed"],
           "fd_vs_dense": r["fd_compressed_vs_dense"], "accuracy": r["accuracy_compressed"],
           "time_s": r["time_compressed_s"], "speedup": r["speedup"], "calibration_s": r["calibration_s"],
           "method_counts": r["method_counts"]}
    factors = {k.removeprefix("accuracy_compressed_"): v for k, v in r.items() if k.startswith("accuracy_compressed_")}
    if factors:
        row["accuracy_factors"] = factors
    return row


def run_table(which: str, settings: list[Setting] | None = None, *, weights_dir=None, device: str = "cpu",
              dtype: torch.dtype = torch.float32, n: int | None = None, steps: int = FULL_SIZE["steps"],
              batch_size: int = FULL_SIZE["batch_size"], guidance_scale: float | None = None,
              n_reference: int = FULL_SIZE["n_reference"], grid: tuple[str, ...] = (), grid_samples: int = 0,
              log=print, progress=None) -> dict:
    """Measure every setting of one table against one dense set on a trained testbed model.

    Args:
        which: one of ``TABLES``; the model is ``TESTBED[which]``.
        settings: the rows (default ``table_settings(which)``).
        weights_dir: folder with ``<testbed>/`` and ``<testbed>_classifier/`` (default: shipped weights).
        device, dtype: where and in which precision the pipeline runs (the classifier: float32).
        n, steps, batch_size, guidance_scale, n_reference: as ``evaluate`` (defaults: ``FULL_SIZE``;
            guidance ``None``: the pipeline's default, recorded in the result).
        grid: labels of settings whose first ``grid_samples`` samples are kept (``"dense"`` too).
        log: called with one line per row.
        progress: a ``tqdm``-like factory for a bar counting the rows (dense included); None: no bar.

    Returns:
        ``{"table", "n", "steps", "guidance_scale", "batch_size", "n_reference", "dtype", "dense",
        "rows", "samples", "seconds"}``: ``dense`` the plain dense set's time, Fréchet distance
        and accuracy; ``rows`` one dict per setting (``_row``); ``samples`` label -> CPU tensor
        in [0, 1] for the grid (not JSON).
    """
    if which not in TABLES:
        raise ValueError(f"which must be one of {TABLES}, got {which!r}")
    settings = settings if settings is not None else table_settings(which)
    n = FULL_SIZE[f"samples_{TESTBED[which]}"] if n is None else n
    t0 = time.perf_counter()
    pipe, clf = load_trained(TESTBED[which], weights_dir=weights_dir, device=device, dtype=dtype)
    guidance = default_guidance(pipe) if guidance_scale is None else float(guidance_scale)
    kw = dict(n=n, steps=steps, batch_size=batch_size, guidance_scale=guidance, classifier=clf,
              n_reference=n_reference, inputs=table_inputs(pipe, which, n), warmup=str(device).startswith("cuda"))
    bar = progress(total=len(settings) + 1, desc=f"quality {which}", unit="row") if progress is not None else None
    dense = evaluate(pipe, None, return_samples=True, **kw)
    if bar is not None:
        bar.update()
    log(f"{which} dense: {dense['time_dense_s']:.2f} s, FD to data {dense['fd_dense']:.4g}, "
        f"accuracy {dense['accuracy_dense']:.3f}")
    samples = {"dense": dense["samples_dense"][:grid_samples]} if "dense" in grid else {}
    rows = []
    for s in settings:
        method = _all_full_plan(pipe, steps) if s.method is None else s.method
        r = evaluate(pipe, method, dense=dense, return_samples=s.label in grid, **kw)
        rows.append(_row(s, r))
        if s.label in grid:
            samples[s.label] = r["samples_compressed"][:grid_samples]
        if bar is not None:
            bar.update()
        log(f"{which} {s.label}: attention FLOPs {100 * r['attention_flops_ratio']:.1f}%, PSNR {r['psnr']:.2f} dB, "
            f"accuracy {r['accuracy_compressed']:.3f}, {r['time_compressed_s'] + r['calibration_s']:.1f} s")
    if bar is not None:
        bar.close()
    dense_summary = {k: v for k, v in dense.items() if k == "time_dense_s" or k.startswith(("fd_", "accuracy_"))}
    return {"table": which, "n": n, "steps": steps, "guidance_scale": guidance, "batch_size": batch_size,
            "n_reference": n_reference, "dtype": str(dtype).removeprefix("torch."), "dense": dense_summary,
            "rows": rows, "samples": samples, "seconds": time.perf_counter() - t0}


def most_compressing(rows: list[dict], min_psnr: float = MIN_PSNR) -> dict[str, dict | None]:
    """Per group (dense left out, in order of first appearance): the row with the fewest
    attention FLOPs among those whose mean PSNR against dense is ≥ ``min_psnr`` (ties: the
    higher PSNR), or ``None`` where no row of the group gets there."""
    best: dict[str, dict | None] = {}
    for r in rows:
        if r["group"] == "dense":
            continue
        current = best.setdefault(r["group"], None)
        if not r["psnr"] >= min_psnr:  # NaN never qualifies
            continue
        if current is None or (r["attention_flops_ratio"], -r["psnr"]) < (current["attention_flops_ratio"],
                                                                           -current["psnr"]):
            best[r["group"]] = r
    return best


# ------------------------------------------------------------------------------ rendering
def _num(x: float, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "∞" if math.isinf(x) else format(x, fmt)


def _counts(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return " · ".join(f"{m} {100 * c / total:.0f}%" for m, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c)


def markdown_table(result: dict) -> str:
    """The Markdown table of one ``run_table`` result."""
    head = [*TABLE_COLUMNS[result["table"]], "attn FLOPs", "PSNR dB", "PSNR min", "SSIM", "FD→data",
            "FD↔dense", "accuracy", "time s", "speed-up", "methods"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [*r["columns"], f"{100 * r['attention_flops_ratio']:.1f}%", _num(r["psnr"], ".2f"),
                 _num(r["psnr_min"], ".2f"), _num(r["ssim"], ".4f"), _num(r["fd_data"], ".4g"),
                 _num(r["fd_vs_dense"], ".4g"), f"{100 * r['accuracy']:.1f}%", f"{r['time_s']:.2f}",
                 f"{r['speedup']:.2f}×", _counts(r["method_counts"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_best(rows: list[dict], min_psnr: float = MIN_PSNR) -> str:
    """One line per group: its most compressing setting that keeps mean PSNR ≥ ``min_psnr``."""
    lines = [f"Most compressing setting with mean PSNR against dense ≥ {min_psnr:g} dB:", ""]
    for group, r in most_compressing(rows, min_psnr).items():
        lines.append(f"- {group}: " + ("none" if r is None else
                                       f"**{r['label']}** (attention FLOPs {100 * r['attention_flops_ratio']:.1f}%, "
                                       f"PSNR {_num(r['psnr'], '.2f')} dB, accuracy {100 * r['accuracy']:.1f}%)"))
    return "\n".join(lines)


def render_section(result: dict, env: dict, command: str, links: dict[str, str], toy: bool) -> str:
    """The Markdown section of one table: heading, environment and sizes, the command, raw files,
    the table, the ≥ 30 dB picks, the plot and the sample grid."""
    which, d = result["table"], result["dense"]
    lines = [f"## {TABLE_TITLES[which]} (generated by `ditaccel quality`)", ""]
    if toy:
        lines += ["**Toy run**: toy-size models and sample counts, to check the plumbing. Not a measurement.", ""]
    lines += [f"{env['device']}, torch {env['torch']}, {result['dtype']}, {env['date']}. {result['n']} samples "
              f"(seeds 0..{result['n'] - 1}), {result['steps']} steps, guidance {result['guidance_scale']:g}, "
              f"batch {result['batch_size']}, {result['n_reference']} procedural reference samples; dense: "
              f"{d['time_dense_s']:.2f} s, FD to data {_num(d['fd_dense'], '.4g')}, accuracy "
              f"{100 * d['accuracy_dense']:.1f}%.",
              f"Reproduce: `{command}`. Raw: `{links['json']}`.", "", markdown_table(result), "",
              markdown_best(result["rows"])]
    if "plot" in links:
        lines += ["", f"![PSNR and accuracy against attention FLOPs]({links['plot']})"]
    if "grid" in links:
        what = ("one column per class, rows: dense and the compressed settings" if TESTBED[which] == "image" else
                f"{GRID_FRAMES} frames per sample, rows: each sample dense and compressed")
        lines += ["", f"Samples ({what}):", "", f"![samples]({links['grid']})"]
    return "\n".join(lines)


def plot_table(result: dict, path: str | os.PathLike, min_psnr: float = MIN_PSNR) -> None:
    """PNG: PSNR against dense (left) and classifier accuracy (right) against attention FLOPs,
    one curve per group, points labelled; dense is the star at 100% (its PSNR, ∞ when exact, is
    left out of the left panel)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax_psnr, ax_acc = fig.subplots(1, 2)
    groups = list(dict.fromkeys(r["group"] for r in result["rows"] if r["group"] != "dense"))
    for group in groups:
        pts = sorted((r for r in result["rows"] if r["group"] == group), key=lambda r: r["attention_flops_ratio"])
        x = [100 * r["attention_flops_ratio"] for r in pts]
        finite = [(xi, r) for xi, r in zip(x, pts) if math.isfinite(r["psnr"])]
        line, = ax_psnr.plot([xi for xi, _ in finite], [r["psnr"] for _, r in finite], "o-", label=group)
        ax_acc.plot(x, [100 * r["accuracy"] for r in pts], "o-", color=line.get_color(), label=group)
        for xi, r in finite:
            ax_psnr.annotate(r["label"].split()[0], (xi, r["psnr"]), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")
    for r in result["rows"]:
        if r["group"] == "dense":
            ax_acc.plot([100 * r["attention_flops_ratio"]], [100 * r["accuracy"]], "k*", markersize=10, label="dense")
            ax_acc.axhline(100 * r["accuracy"], color="grey", linewidth=0.8, linestyle="--")
    ax_psnr.axhline(min_psnr, color="grey", linewidth=0.8, linestyle="--")
    ax_psnr.set_ylabel("PSNR against dense (dB, mean)")
    ax_acc.set_ylabel("classifier accuracy (%)")
    for ax in (ax_psnr, ax_acc):
        ax.set_xlabel("attention FLOPs (% of dense)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{TABLE_TITLES[result['table']]}: {result['n']} samples, {result['steps']} steps", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def save_grid(result: dict, path: str | os.PathLike) -> None:
    """PNG of the kept samples: image, one row per setting (one column per sample); video, for
    each sample one row per setting (``GRID_FRAMES`` frames spread over the clip)."""
    samples = result["samples"]
    first = next(iter(samples.values()))
    if TESTBED[result["table"]] == "image":
        rows = [(label, to_uint8(x)) for label, x in samples.items()]
    else:
        n = min(len(x) for x in samples.values())
        rows = [(f"#{i} {label}", video_frames(x[i], GRID_FRAMES)) for i in range(n) for label, x in samples.items()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    side_by_side(rows, path, scale=max(1, round(GRID_TILE_PX[TESTBED[result["table"]]] / first.shape[-1])))


# ------------------------------------------------------------------------------ the command
def check_weights(weights_dir, tables: tuple[str, ...]) -> Path:
    """The weights folder, or a ``ValueError`` naming ``--weights`` and the missing folder."""
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    for which in dict.fromkeys(TESTBED.get(t, t) for t in tables):
        for part in (which, f"{which}_classifier"):
            if not (root / part).is_dir():
                what = "classifiers" if part.endswith("classifier") else which
                raise ValueError(f"--weights (weights_dir): no trained testbed folder {root / part}; train it with "
                                 f"`ditaccel testbed train {what}` or pass the folder that holds {part}/")
    return root



def check_weights_arg(weights: str | None, tables: tuple[str, ...]):
    """``--weights``: the folder of trained testbed models (``quality.check_weights``), as a ``UsageError``."""
    try:
        return check_weights(weights, tables)
    except ValueError as e:
        raise UsageError("--weights", str(e).removeprefix("--weights (weights_dir): ")) from None


def _command(which: str, *, weights_dir, device: str, dtype: str, n: int, steps: int, batch_size: int,
             guidance_scale: float | None, toy: bool) -> str:
    option = f"--samples-{TESTBED[which]}"
    parts = ["ditaccel quality --only", which, option, str(n), "--steps", str(steps), "--batch-size",
             str(batch_size), "--device", device, "--dtype", dtype]
    if guidance_scale is not None:
        parts += ["--guidance-scale", f"{guidance_scale:g}"]
    if weights_dir is not None:
        parts += ["--weights", os.fspath(weights_dir)]
    if toy:
        parts.append("--toy")
    return " ".join(parts)


def resolve_run(device: str | None, dtype: str | None, out_md: str | None, results_dir: str | None, toy: bool,
                command: str) -> tuple[str, str, str, str]:
    """Defaults of a testbed command's run: the device (CUDA if available; toy runs: the CPU), the
    dtype name (bfloat16 on CUDA, float32 elsewhere; checked), the Markdown file (``QUALITY.md``; toy
    runs: a fresh temporary folder's) and the results folder (``docs/results``; toy runs: next to
    the Markdown file)."""
    device = device or ("cpu" if toy else default_device())
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in TOOL_DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(TOOL_DTYPES)}, got {dtype!r}")
    if out_md is None:
        out_md = (os.path.join(tempfile.mkdtemp(prefix=f"ditaccel-{command}-toy-"), "QUALITY.md") if toy
                  else "QUALITY.md")
    if results_dir is None:
        results_dir = (os.path.join(os.path.dirname(os.path.abspath(out_md)), "results") if toy
                       else os.path.join("docs", "results"))
    return device, dtype, out_md, results_dir


def run_quality(only: str | None = None, *, weights_dir=None, device: str | None = None, dtype: str | None = None,
                samples_image: int | None = None, samples_video: int | None = None, steps: int | None = None,
                batch_size: int | None = None, guidance_scale: float | None = None, out_md: str | None = None,
                results_dir: str | None = None, toy: bool = False, log=print, progress=None) -> dict[str, dict]:
    """Run the selected tables and write their sections, JSON, plots and sample grids.

    Defaults (``FULL_SIZE``; ``toy=True``: ``TOY_SIZE``, for CPU smoke runs): 256 image and 64
    video samples, 50 steps, batch 32, 512 reference samples, AdaSpa block size 64. A real run
    writes to ``QUALITY.md`` and ``docs/results`` (relative to the current directory); a toy
    run, unless told otherwise, to a fresh temporary folder. ``dtype``: a name of ``TOOL_DTYPES``
    (default bfloat16 on CUDA, float32 elsewhere). ``log``: called with each progress line;
    ``progress``: a ``tqdm``-like factory for a bar over each table's rows (default: none).
    Returns ``{table: run_table result}``.
    """
    tables = TABLES if only is None else (only,)
    if any(t not in TABLES for t in tables):
        raise ValueError(f"--only: expected one of {TABLES}, got {only!r}")
    root = check_weights(weights_dir, tables)
    size = dict(TOY_SIZE if toy else FULL_SIZE)
    for key, value in (("samples_image", samples_image), ("samples_video", samples_video), ("steps", steps),
                       ("batch_size", batch_size)):
        if value is not None:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: must be a positive integer, got {value!r}")
            size[key] = value
    for key in ("samples_image", "samples_video"):
        if key.removeprefix("samples_") in {TESTBED[t] for t in tables} and size[key] < 2:
            raise ValueError(f"{key}: the Fréchet distances need at least 2 samples, got {size[key]}")
    device, dtype, out_md, results_dir = resolve_run(device, dtype, out_md, results_dir, toy, "quality")
    no_plot = missing_matplotlib()
    if no_plot:
        log(f"ditaccel quality: {no_plot}")
    md_dir = os.path.dirname(os.path.abspath(out_md))
    results = {}
    for which in tables:
        n = size[f"samples_{TESTBED[which]}"]
        settings = table_settings(which, block_size=size["block_size"])
        result = run_table(which, settings, weights_dir=root, device=device, dtype=TOOL_DTYPES[dtype], n=n,
                           steps=size["steps"], batch_size=size["batch_size"], guidance_scale=guidance_scale,
                           n_reference=size["n_reference"], grid=("dense", *GRID_SETTINGS[which]),
                           grid_samples=GRID_SAMPLES[which], log=log, progress=progress)
        env = environment(device)
        stem = result_stem(results_dir, env, f"quality-{which}")
        files = {"json": stem + ".json", "grid": stem + "-samples.png"}
        if not no_plot:
            files["plot"] = stem + ".png"
            plot_table(result, files["plot"])
        save_grid(result, files["grid"])
        command = _command(which, weights_dir=weights_dir, device=device, dtype=dtype, n=n, steps=size["steps"],
                           batch_size=size["batch_size"], guidance_scale=guidance_scale, toy=toy)
        best = {g: None if r is None else r["label"] for g, r in most_compressing(result["rows"]).items()}
        payload = {k: v for k, v in result.items() if k != "samples"}
        write_json(files["json"], jsonable({"command": command, "toy": toy, "environment": env,
                                             "weights": os.fspath(root), "min_psnr": MIN_PSNR,
                                             "most_compressing": best, **payload}))
        links = {k: os.path.relpath(os.path.abspath(f), md_dir) for k, f in files.items()}
        update_markdown(out_md, f"quality-{which}", render_section(result, env, command, links, toy))
        log(f"{which}: {len(result['rows'])} rows in {result['seconds']:.1f} s; wrote {out_md}, "
            f"{', '.join(files.values())}")
        results[which] = result
    return results


DESCRIPTION = ("Quality tables on the trained testbed models: DiTFastAttn D1..D6 and the residual-sharing ablation "
               "(image), AdaSpa sparsity x head-adaptive x LSE cache (video), DiTFastAttn D1..D6 with both search "
               "losses (video-ditfastattn), each against dense with the same seeds. Writes QUALITY.md sections, raw JSON, plots and sample grids.")


def add_arguments(p) -> None:
    """``ditaccel quality``'s options, on ``p`` (its parser in the ``ditaccel.cli`` tree)."""
    p.add_argument("--weights", help="folder with image/, video/, image_classifier/, video_classifier/ (default: "
                   "the shipped weights)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, auto, ... (default: cuda if available, else cpu; --toy: cpu)")
    p.add_argument("--dtype", choices=list(TOOL_DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--samples-image", type=positive_int, help=f"image samples, 2 or more (default: "
                   f"{FULL_SIZE['samples_image']}; --toy {TOY_SIZE['samples_image']})")
    p.add_argument("--samples-video", type=positive_int, help=f"video samples (both video tables), 2 or more (default: "
                   f"{FULL_SIZE['samples_video']}; --toy {TOY_SIZE['samples_video']})")
    p.add_argument("--steps", type=positive_int, help=f"denoising steps of both tables (default: "
                   f"{FULL_SIZE['steps']}; --toy {TOY_SIZE['steps']})")
    p.add_argument("--batch-size", type=positive_int, help=f"samples per pipeline call (default: "
                   f"{FULL_SIZE['batch_size']}; --toy {TOY_SIZE['batch_size']})")
    p.add_argument("--guidance-scale", type=float_in(0.0), help="CFG scale (default: each pipeline's own)")
    p.add_argument("--only", choices=list(TABLES), help="one table (default: all)")
    p.add_argument("--out-md", help="the Markdown file to update (default: QUALITY.md; --toy: a temporary file)")
    p.add_argument("--results-dir", help="where JSON and PNGs go (default: docs/results; --toy: next to --out-md)")
    p.add_argument("--toy", action="store_true", help="toy sample counts and steps on the CPU, to check the "
                   "plumbing (with toy weights: `ditaccel testbed train ... --toy`)")


def check_run_args(args) -> None:
    """The checks ``quality`` and ``worth`` share, before any model is loaded: device, output paths,
    at least 2 samples (the Fréchet distances)."""
    check_weights_arg(args.weights, TABLES if args.only is None else (args.only,))
    if args.device is not None:
        args.device = check_device(args.device)  # auto: resolved here
    check_out_file("--out-md", args.out_md)
    if args.results_dir is not None:
        check_out_dir("--results-dir", args.results_dir)
    for which in ("image", "video"):
        n = getattr(args, f"samples_{which}")
        if n is not None and n < 2 and (args.only is None or TESTBED.get(args.only, args.only) == which):
            raise UsageError(f"--samples-{which}", f"the Fréchet distances need at least 2 samples, got {n}")


def run(args) -> int:
    """``ditaccel quality`` (parsed by ``add_arguments``): 0 on success; bad arguments raise
    ``ValueError`` before any model is loaded."""
    check_run_args(args)
    run_quality(args.only, weights_dir=args.weights, device=args.device, dtype=args.dtype,
                samples_image=args.samples_image, samples_video=args.samples_video, steps=args.steps,
                batch_size=args.batch_size, guidance_scale=args.guidance_scale, out_md=args.out_md,
                results_dir=args.results_dir, toy=args.toy, log=printer(args), progress=progress_bar(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditaccel quality [options]`` (the same parser and errors): 0 on success, 2 on bad arguments."""
    return tool_main("quality", add_arguments, argv, description=DESCRIPTION, progress=True, func=run)


if __name__ == "__main__":
    sys.exit(main())
