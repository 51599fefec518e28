"""Where benchmark results go: Markdown sections, raw JSON, plots, and the run's environment.

``ditaccel bench all`` writes every case's table into a Markdown file (``BENCHMARKS.md`` by
default) as a section between two HTML comments that Markdown renders as nothing::

    <!-- bench:NAME:start -->
    ... generated text ...
    <!-- bench:NAME:end -->

A later run replaces the text between the markers of the same ``NAME`` and leaves everything
else in the file byte for byte as it was; a case without markers yet is appended at the end.
Hand-written prose belongs outside the markers. Raw results go to
``<results dir>/<date>-<device slug>-<NAME>.json`` (plots: same stem, ``.png``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re

import torch

_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]*")
#: vendor and marketing words left out of a device slug ("NVIDIA H100 80GB HBM3" -> "h100")
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "amd", "radeon", "instinct", "intel"}


def _markers(name: str) -> tuple[str, str]:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"section name must be lowercase letters, digits, '.' or '-' (starting with a letter or "
                         f"digit), got {name!r}")
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the section ``name`` set to ``body``.

    The section is ``start marker + newline + body + newline + end marker``. If both markers of
    ``name`` are present (once each, start before end) the span from the start marker to the end
    marker is replaced and nothing else changes; if neither is present the section is appended
    after one blank line (a file that does not end with a newline gets one). A lone, repeated or
    misordered marker raises ``ValueError``: the file was edited by hand and needs a look.
    """
    start, end = _markers(name)
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    n_start, n_end = text.count(start), text.count(end)
    if n_start == 0 and n_end == 0:
        if not text:
            return block + "\n"
        return text + ("" if text.endswith("\n") else "\n") + "\n" + block + "\n"
    i, j = text.find(start), text.find(end)
    if n_start != 1 or n_end != 1 or j < i:
        raise ValueError(f"section {name!r}: expected one {start} followed by one {end}, found {n_start} start "
                         f"and {n_end} end marker(s){' in the wrong order' if n_start == n_end == 1 else ''}")
    return text[:i] + block + text[j + len(end):]


def update_markdown(path: str | os.PathLike, name: str, body: str) -> None:
    """Replace or append the section ``name`` of the Markdown file ``path`` (created if missing)."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    new = replace_section(text, name, body)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def device_name(device: str) -> str:
    """The accelerator's marketing name for a CUDA device string, else ``"cpu"``."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def device_slug(name: str) -> str:
    """A short file-name-safe device id: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``,
    ``"NVIDIA GeForce RTX 4090"`` -> ``"rtx-4090"``, ``"cpu"`` -> ``"cpu"``: the words up to and
    including the first one with a digit, vendor words left out."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR_WORDS]
    for i, w in enumerate(words):
        if any(c.isdigit() for c in w):
            return "-".join(words[: i + 1])
    return "-".join(words) or "unknown"


def environment(device: str, date: str | None = None) -> dict:
    """What a reader needs to compare a number: device name and slug, torch and Triton versions,
    CUDA version (None on CPU), CPU threads and the date (today unless given)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = device_name(device)
    return {"device": name, "device_slug": device_slug(name), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda if name != "cpu" else None, "torch_threads": torch.get_num_threads(),
            "date": date or datetime.date.today().isoformat()}


def result_stem(results_dir: str | os.PathLike, env: dict, name: str) -> str:
    """``<results_dir>/<date>-<device slug>-<name>`` (add ``.json`` / ``.png``)."""
    _markers(name)
    return os.path.join(results_dir, f"{env['date']}-{env['device_slug']}-{name}")


def jsonable(value):
    """JSON-safe copy of nested dicts / lists: dtypes by name ("bfloat16"), non-finite floats as
    the strings "inf" / "-inf" / "nan" (strict JSON has none)."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def render_section(name: str, env: dict, shapes: str, command: str, table: str, files: list[str],
                   dry_run: bool = False) -> str:
    """The Markdown of one case: a heading, the environment line (device, torch, Triton, date),
    the shapes, the command that reproduces it, links to the raw files, then the table."""
    triton_version = env["triton"] or "not installed"
    lines = [f"## `{name}` (generated by `ditaccel bench all`)", ""]
    if dry_run:
        lines += ["**Dry run**: toy sizes on the CPU, to check the plumbing. Not a measurement.", ""]
    lines += [f"{env['device']}, torch {env['torch']}, Triton {triton_version}, {env['date']}. {shapes}.",
              f"Reproduce: `{command}`. Raw: {', '.join(f'`{p}`' for p in files)}.", "", table.strip("\n")]
    return "\n".join(lines)


def missing_matplotlib() -> str | None:
    """None if matplotlib can be imported, else the message to show instead of a plot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot is written"
    return None


def plot_sparsity(result: dict, path: str | os.PathLike) -> None:
    """PNG of block-sparse speed-up over dense SDPA vs the kept fraction (log-log): ours, compiled
    FlexAttention, and the ideal ``1 / kept`` (time proportional to the kept tiles).

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch). Raises
    ``RuntimeError`` naming the fix when matplotlib is missing.
    """
    problem = missing_matplotlib()
    if problem:
        raise RuntimeError(problem)
    from matplotlib.figure import Figure

    rows = sorted(result["rows"], key=lambda x: x["kept"])
    kept = [x["kept"] for x in rows]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(kept, [1 / x for x in kept], "k--", label="ideal: 1 / kept")
    ax.plot(kept, [x["ours_speedup"] for x in rows], "o-", label=f"ours ({result['ours_backend']})")
    ax.plot(kept, [x["flex_speedup"] for x in rows], "s-", label="FlexAttention")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(kept, [f"{x:.3g}" for x in kept])
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.set_xlabel("kept fraction of key blocks")
    ax.set_ylabel("speed-up vs dense SDPA")
    ax.set_title(f"{result['batch']}x{result['heads']}x{result['tokens']:,}x{result['head_dim']} {result['dtype']}, "
                 f"block {result['block_size']}\n{result['device']}, {result['date']}", fontsize=9)
    ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
