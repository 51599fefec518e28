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
import statistics

import torch

from .harness import _tflops

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


def _sweep_title(r: dict) -> str:
    return (f"{r['model']} ({r['class']}, {r['layers']} layers, {r['tokens']} tokens), {r['steps']} steps, "
            f"{r['calibration_inputs']} calibration inputs, window {r['window']}, search {r['search']}, "
            f"{r['device']} ({r['torch_threads']} threads)")


def markdown_sweep(r: dict) -> str:
    """The Markdown table of a :func:`bench_sweep` result."""
    lines = ["| δ | calibration (s) | attention FLOPs | full/wars/ast/asc/wars+asc | PSNR vs dense (dB) |",
             "|---|---|---|---|---|"]
    for x in r["rows"]:
        c = x["plan_counts"]
        counts = "/".join(str(c[m]) for m in ("full", "wars", "ast", "asc", "wars+asc"))
        lines.append(f"| {x['threshold']} ({x['delta']:.3f}) | {x['calibration_s']:.1f} | "
                     f"{100 * x['attention_flops_ratio']:.1f}% | {counts} | {x['psnr_vs_dense']:.1f} |")
    return "\n".join(lines)


def format_sweep(r: dict) -> str:
    return f"{_sweep_title(r)}, torch {r['torch']}, {r['date']}\n{markdown_sweep(r)}"


def format_adaspa(r: dict) -> str:
    lines = [f"AdaSpa kernels: 1 x {r['heads']} heads x {r['tokens']} tokens x {r['head_dim']}, block {r['block_size']}, "
             f"{r['dtype']}, {r['device']}, torch {r['torch']}, {r['date']}",
             f"  dense SDPA (cuDNN first)        {r['dense_ms']:9.2f} ms  ({r['dense_tflops']:.0f} TFLOP/s)",
             f"  first search: attention + LSE   {r['attention_with_lse_ms']:9.2f} ms",
             f"                block mass        {r['block_mass_ms']:9.2f} ms  ({r['block_mass_ms'] / r['dense_ms']:.2f}x dense)",
             f"                top-k + tiers     {r['select_ms']:9.2f} ms",
             f"  first search total              {r['search_first_ms']:9.2f} ms",
             f"  cached-LSE search total         {r['search_cached_ms']:9.2f} ms"]
    for x in r["sparse"]:
        lines.append(f"  sparse s={x['sparsity']}: density {x['density']:.3f}, recall {x['recall']:.3f}, "
                     f"{x['ms']:.2f} ms ({x['speedup']:.2f}x dense, {x['effective_tflops']:.0f} TFLOP/s effective)")
        if "search_previous_ms" in x:
            lines.append(f"    first search step from the previous step's LSE: {x['search_previous_ms']:.2f} ms "
                         f"({x['search_previous_ms'] / r['dense_ms']:.2f}x dense)")
    return "\n".join(lines)


def format_adaspa_step(r: dict) -> str:
    lines = [f"{r['model']} transformer (random weights), {r['tokens']} tokens, {r['steps']} steps, {r['dtype']}, "
             f"{r['device']}, torch {r['torch']}, {r['date']}",
             f"  dense step (SDPA, cuDNN first): {r['dense_step_ms']:.1f} ms; {r['steps']} steps "
             f"{r['dense_step_ms'] * r['steps']:.0f} ms"]
    for run in r["runs"]:
        by = {}
        for what, ms in zip(run["schedule"], run["step_ms"]):
            by.setdefault(what, []).append(ms)
        parts = ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in by.items())
        lines.append(f"  AdaSpa s={run['sparsity']}: {parts}; total {run['total_ms']:.0f} ms "
                     f"({r['dense_step_ms'] * r['steps'] / run['total_ms']:.2f}x), attention FLOPs "
                     f"{100 * run['attention_flops_ratio']:.1f}%, density {run['mean_density']:.3f}, recall "
                     f"{', '.join(f'{x:.3f}' for x in run['mean_recall'])}")
    return "\n".join(lines)


def format_step(r: dict) -> str:
    lines = [f"{r['model']} transformer, {r['tokens']} tokens x batch {r['batch']} (CFG), {r['heads']} heads x "
             f"{r['head_dim']}, {r['dtype']}, {r['device']}, torch {r['torch']}, window {r['window']}, {r['date']}",
             f"  dense step (SDPA, cuDNN first): {r['dense_step_ms']:.1f} ms"]
    for s in r["steps"]:
        lines.append(f"  step {s['step']}  {s['method']:<9} {s['ms']:8.1f} ms   {s['speedup']:.2f}x")
    lines.append(f"  plan total {r['plan_total_ms']:.1f} ms vs dense {r['dense_total_ms']:.1f} ms "
                 f"({r['dense_total_ms'] / r['plan_total_ms']:.2f}x); attention FLOPs "
                 f"{100 * r['attention_flops_ratio']:.1f}%; peak cache {r['cache_bytes_peak'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def sparsity_shapes(r: dict) -> str:
    """One line: what :func:`bench_sparsity` measured."""
    t = r["timing"]
    return (f"{r['batch']} × {r['heads']} heads × {r['tokens']:,} tokens × {r['head_dim']}, {r['dtype']}, block "
            f"{r['block_size']}; random per-head block masks keeping the diagonal; median of {t['repeats']} runs "
            f"after {t['warmup']} warm-up, {t['input_copies']} input set(s) in rotation, outputs checked against "
            f"an exact reference on {t['checked_rows']} query rows first")


def markdown_sparsity(r: dict) -> str:
    """The Markdown table of a :func:`bench_sparsity` result."""
    bs = r["block_size"]
    lines = [f"Dense SDPA (cuDNN first): {r['dense_ms']:.2f} ms ({_tflops(r['dense_tflops'])} TFLOP/s). "
             "FlexAttention twice: as the `flex` backend runs it (its BlockMask rebuilt from the indices on "
             "every call, time included) and as a user writes it, the BlockMask built once outside the "
             "timed region (\"prebuilt\").", "",
             f"| kept (target) | key blocks per row | ours (`{r['ours_backend']}`) ms | Flex prebuilt ms | "
             "Flex rebuilt per call ms | ours vs dense | Flex prebuilt vs dense | ideal 1/kept | "
             "ours TFLOP/s (effective) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        pre = x.get("flex_prebuilt_ms")
        lines.append(f"| {x['kept']:.4f} ({x['kept_target']:g}) | {x['blocks_per_row']} | {x['ours_ms']:.2f} | "
                     + (f"{pre:.2f}" if pre is not None else "—") + f" | {x['flex_ms']:.2f} | "
                     f"**{x['ours_speedup']:.2f}×** | "
                     + (f"{x['flex_prebuilt_speedup']:.2f}×" if pre is not None else "—")
                     + f" | {x['ideal_speedup']:.2f}× | {_tflops(x['ours_effective_tflops'])} |")
    native = [x for x in r["rows"] if "ours_native_ms" in x]
    if native:
        nb = r["native_block"]
        lines += ["", f"The same at {nb}-token blocks (FlexAttention's native tile; block {bs} above), "
                  "FlexAttention prebuilt:", "",
                  "| kept (target) | ours ms | Flex ms | ours vs dense | Flex vs dense | ours vs Flex |",
                  "|---|---|---|---|---|---|"]
        for x in native:
            lines.append(f"| {x['kept_native']:.4f} ({x['kept_target']:g}) | {x['ours_native_ms']:.2f} | "
                         f"{x['flex_native_ms']:.2f} | {x['ours_native_speedup']:.2f}× | "
                         f"{x['flex_native_speedup']:.2f}× | {x['flex_native_ms'] / x['ours_native_ms']:.2f}× |")
    return "\n".join(lines)


def step_shapes(r: dict) -> str:
    return (f"{r['model']} transformer, random weights, {r['layers']} layers, {r['tokens']:,} tokens × batch "
            f"{r['batch']} (CFG), {r['heads']} heads × {r['head_dim']}, {r['dtype']}, window {r['window']}; hand-made "
            f"plan, one method per step for all layers; median of {r['repeats']} generations per step")


def markdown_step(r: dict) -> str:
    """The Markdown table of a :func:`bench_step` result."""
    lines = [f"| step | method | ms | speed-up vs dense ({r['dense_step_ms']:.1f} ms) |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | `{s['method']}` | {s['ms']:.1f} | {s['speedup']:.2f}× |" for s in r["steps"]]
    lines += ["", f"Plan total {r['plan_total_ms']:.1f} ms vs {r['dense_total_ms']:.1f} ms dense "
                  f"({r['dense_total_ms'] / r['plan_total_ms']:.2f}×); attention FLOPs "
                  f"{100 * r['attention_flops_ratio']:.1f}% of dense; peak cache "
                  f"{r['cache_bytes_peak'] / 2**30:.2f} GiB."]
    return "\n".join(lines)


def attention_shapes(r: dict) -> str:
    t = r["timing"]
    return (f"B={r['batch']}, H={r['heads']}, L={r['tokens']:,}, D={r['head_dim']}, {r['dtype']}, window "
            f"`{r['window']}` ({100 * r['pair_fraction']:.1f}% of the (q, k) pairs); median of {t['repeats']} runs, "
            f"{t['input_copies']} input set(s) in rotation, outputs checked first")


def markdown_attention(r: dict) -> str:
    """The Markdown table of a :func:`bench_attention` result."""
    lines = ["| kernel | tiles computed (128×128) | ms | TFLOP/s (effective = kept tiles) | vs dense |",
             "|---|---|---|---|---|",
             f"| dense SDPA (cuDNN first) | 100% | {r['dense_ms']:.2f} | {_tflops(r['dense_tflops'])} | 1.00× |",
             f"| window `{r['window']}` | {100 * r['tile_fraction']:.1f}% | {r['window_ms']:.2f} | "
             f"{_tflops(r['window_effective_tflops'])} | {r['speedup']:.2f}× |"]
    for key, label in (("window_flex_ms", "window, FlexAttention (compiled)"),
                       ("window_triton_ms", "window, tile kernel (Triton)"),
                       ("full_plus_window_two_calls_ms", "full + window, two calls (dense + `auto` window)"),
                       ("full_and_window_one_pass_ms", "full + window, tile kernel: window pass, then the rest "
                                                       "continuing its softmax")):
        if key in r:
            lines.append(f"| {label} | | {r[key]:.2f} | | {r['dense_ms'] / r[key]:.2f}× |")
    return "\n".join(lines)


def adaspa_shapes(r: dict) -> str:
    t = r["timing"]
    return (f"1 × {r['heads']} heads × {r['tokens']:,} tokens × {r['head_dim']} ({r['text_tokens']} text), "
            f"{r['dtype']}, block {r['block_size']}, structured space-time q/k (`structured_qkv`); median of "
            f"{t['repeats']} runs, outputs checked first")


def markdown_adaspa(r: dict) -> str:
    """The Markdown table of a :func:`bench_adaspa` result."""
    d = r["dense_ms"]

    def x(ms):  # the "vs dense" cell (results before 2026-12-03 left it empty)
        return f"**{ms / d:.2f}×**" if "lse_over_dense" in r else ""

    select = ("`select_mask` on the whole W" if "select_dense_ms" not in r else  # results before 2026-12-03 evening
              f"`search_mask`, as the method runs it (`select_mask` on the whole W: {r['select_dense_ms']:.1f} ms)")

    lines = ["| | ms | vs dense | notes |", "|---|---|---|---|",
             f"| dense SDPA | {d:.1f} | 1.00× | {_tflops(r['dense_tflops'])} TFLOP/s |",
             f"| first search: attention + LSE | {r['attention_with_lse_ms']:.1f} | "
             f"{x(r['attention_with_lse_ms'])} | also a `dense_lse` step's attention |",
             f"| first search: block mass | {r['block_mass_ms']:.1f} | | {r['block_mass_ms'] / d:.2f}× a dense call |",
             f"| top-k + head tiers | {r['select_ms']:.1f} | | {select} |",
             f"| **first search total**, `first_lse=\"fresh\"` | {r['search_first_ms']:.1f} | {x(r['search_first_ms'])} "
             "| its output is dense |",
             f"| **cached-LSE search total** | {r['search_cached_ms']:.1f} | {x(r['search_cached_ms'])} | "
             "block mass + selection |"]
    for x_ in r["sparse"]:
        lines.append(f"| **sparse, s = {x_['sparsity']}** (density {x_['density']:.3f}, recall {x_['recall']:.4f}) | "
                     f"{x_['ms']:.1f} | **{x_['speedup']:.2f}×** | {_tflops(x_['effective_tflops'])} TFLOP/s effective |")
        if "search_previous_ms" in x_:
            lines.append(f"| **first search step, `first_lse=\"previous\"`**, s = {x_['sparsity']} | "
                         f"{x_['search_previous_ms']:.1f} | {x(x_['search_previous_ms'])} | cached-LSE search + "
                         "the sparse call (its output is sparse) |")
    return "\n".join(lines)


def adaspa_step_shapes(r: dict) -> str:
    return (f"{r['model']} transformer, random weights, {r['layers']} layers, {r['tokens']:,} tokens, "
            f"{r['steps']}-step schedule, {r['dtype']}; median of {r['repeats']} generations per step")


#: AdaSpa schedule phases (``AdaSpaConfig.schedule``) as table columns
_PHASES = (("dense", "dense"), ("search", "first search"), ("sparse", "sparse"), ("research", "cached search"))


def markdown_adaspa_step(r: dict) -> str:
    """The Markdown table of a :func:`bench_adaspa_step` result (per phase: median step time)."""
    dense, n = r["dense_step_ms"], r["steps"]
    head = " | ".join(label for _, label in _PHASES)
    lines = [f"| | {head} | {n} steps | attention FLOPs |", "|---" * (len(_PHASES) + 3) + "|",
             f"| dense SDPA | {dense:.1f} ms |{' |' * (len(_PHASES) - 1)} {dense * n:.0f} ms | 100% |"]
    for run in r["runs"]:
        by = {}
        for what, ms in zip(run["schedule"], run["step_ms"]):
            by.setdefault(what, []).append(ms)
        cells = []
        for phase, _ in _PHASES:
            if phase not in by:
                cells.append("")
                continue
            ms = statistics.median(by[phase])
            cells.append(f"**{ms:.1f} ms ({dense / ms:.2f}×)**" if phase == "sparse" else f"{ms:.1f} ms")
        lines.append(f"| AdaSpa s = {run['sparsity']} | {' | '.join(cells)} | {run['total_ms']:.0f} ms "
                     f"({dense * n / run['total_ms']:.2f}×) | {100 * run['attention_flops_ratio']:.1f}% |")
    return "\n".join(lines)


def _pixart_plans(r: dict) -> list[dict]:
    """The plan runs of a ``bench_pixart_plan`` result: ``r["plans"]`` (one per cache dtype), or the one
    plan run of a result from before ``cache_dtypes`` (its keys at the top level, caches in the model's dtype)."""
    if "plans" in r:
        return r["plans"]
    keys = ("plan_ms", "speedup", "attention_flops_ratio", "plan_peak_bytes", "extra_peak_bytes", "cache_bytes_peak")
    return [{"cache_dtype": "model", **{k: r[k] for k in keys}}]


def _cache_label(cache_dtype: str, dtype: str) -> str:
    return f"caches {dtype}" if cache_dtype == "model" else f"caches {cache_dtype}"


def format_pixart_plan(r: dict) -> str:
    c = r["plan_counts"]
    lines = [
        f"{r['model']} transformer, {r['steps']} steps, batch {r['batch']} (CFG), {r['device']}, torch {r['torch']}, "
        f"Triton {r['triton']}, {r['date']}",
        f"  dense: {r['dense_ms'] / 1e3:.2f} s, peak {r['dense_peak_bytes'] / 2**30:.2f} GiB",
    ]
    for p in _pixart_plans(r):
        lines.append(
            f"  plan ({', '.join(f'{m} {n}' for m, n in c.items())}; {_cache_label(p['cache_dtype'], r['dtype'])}; "
            f"attention FLOPs {100 * p['attention_flops_ratio']:.1f}%): {p['plan_ms'] / 1e3:.2f} s ({p['speedup']:.2f}x), "
            f"peak {p['plan_peak_bytes'] / 2**30:.2f} GiB (+{p['extra_peak_bytes'] / 2**30:.2f} GiB over dense; "
            f"caches {p['cache_bytes_peak'] / 2**30:.2f} GiB)")
    return "\n".join(lines)


def format_hunyuan_adaspa(r: dict) -> str:
    c = r["schedule_50"]
    return "\n".join([
        f"HunyuanVideo transformer (random weights), latent {'x'.join(map(str, r['latent']))} = {r['video_tokens']} video "
        f"+ {r['text_tokens']} text tokens, AdaSpa s={r['sparsity']} block {r['block_size']}, {r['device']}, "
        f"torch {r['torch']}, Triton {r['triton']}, {r['date']}",
        f"  dense step {r['dense_ms'] / 1e3:.2f} s | first search {r['search_ms'] / 1e3:.2f} s | sparse "
        f"{r['sparse_ms'] / 1e3:.2f} s ({r['dense_ms'] / r['sparse_ms']:.2f}x) | cached search "
        f"{r['research_ms'] / 1e3:.2f} s | density {r['density']:.3f}",
        f"  50 steps ({c['dense']} dense, {c['search']} search, {c['research']} cached search, {c['sparse']} sparse): "
        f"{r['total_50_ms'] / 1e3:.1f} s vs {r['dense_50_ms'] / 1e3:.1f} s dense ({r['speedup_50']:.2f}x); peak "
        f"{r['adaspa_peak_bytes'] / 2**30:.1f} GiB vs {r['dense_peak_bytes'] / 2**30:.1f} GiB dense",
    ])


def pixart_plan_shapes(r: dict) -> str:
    shape = (f"{r['layers']} layers × {r['heads']} heads × {r['tokens']:,} tokens × head dim {r['head_dim']}"
             if "tokens" in r else f"{r['layers']} layers")
    return (f"{r['model']} transformer, random weights, {shape}, batch 2 (the CFG pair), "
            f"{r['steps']} steps, {r['dtype']}; plan `bench.model_cases.paper_like_plan` (full every 10 steps); "
            "its caches (`wars` residuals, `ast` outputs) in the model's dtype and in float8 "
            "(`DiTFastAttnConfig(cache_dtype=\"float8\")`: e4m3 with float32 scales)")


def markdown_pixart_plan(r: dict) -> str:
    """Dense, then one row per plan run (caches in the model's dtype, in float8)."""
    c = ", ".join(f"{m} {n}" for m, n in r["plan_counts"].items())
    gib = 2**30
    lines = [
        "| | transformer time, all steps | speed-up | attention FLOPs | peak GPU memory | over dense |",
        "|---|---|---|---|---|---|",
        f"| dense SDPA | {r['dense_ms'] / 1e3:.2f} s | 1.00× | 100% | {r['dense_peak_bytes'] / gib:.2f} GiB | |",
    ]
    for p in _pixart_plans(r):
        lines.append(
            f"| DiTFastAttn plan ({c}), {_cache_label(p['cache_dtype'], r['dtype'])} | {p['plan_ms'] / 1e3:.2f} s | "
            f"**{p['speedup']:.2f}×** | {100 * p['attention_flops_ratio']:.1f}% | {p['plan_peak_bytes'] / gib:.2f} GiB | "
            f"+{p['extra_peak_bytes'] / gib:.2f} GiB (caches {p['cache_bytes_peak'] / gib:.2f} GiB) |")
    return "\n".join(lines)


def hunyuan_shapes(r: dict) -> str:
    return (f"HunyuanVideo transformer, random weights, {r['layers']} blocks, latent "
            f"{'×'.join(map(str, r['latent']))} = {r['video_tokens']:,} video + {r['text_tokens']} text tokens, "
            f"{r['dtype']}, AdaSpa s = {r['sparsity']}, block {r['block_size']}; one measured step of each kind")


def markdown_hunyuan(r: dict) -> str:
    c = r["schedule_50"]
    d = r["dense_ms"]
    gib = 2**30
    return "\n".join([
        "| step kind | ms | time / dense step |",
        "|---|---|---|",
        f"| dense | {d:.0f} | 1.00× |",
        *([f"| dense as diffusers runs it (SDPA with the all-True text mask) | {r['dense_masked_ms']:.0f} | "
           f"{r['dense_masked_ms'] / d:.2f}× |"] if "dense_masked_ms" in r else []),
        f"| first search (fresh LSE) | {r['search_ms']:.0f} | {r['search_ms'] / d:.2f}× |",
        f"| sparse (density {r['density']:.3f}) | {r['sparse_ms']:.0f} | **{r['sparse_ms'] / d:.2f}×** |",
        f"| cached-LSE search | {r['research_ms']:.0f} | {r['research_ms'] / d:.2f}× |",
        f"| **50 steps** ({c['dense']} dense, {c['search']} + {c['research']} searches, {c['sparse']} sparse) | "
        f"{r['total_50_ms'] / 1e3:.1f} s vs {r['dense_50_ms'] / 1e3:.1f} s dense | speed-up **{r['speedup_50']:.2f}×** |",
        *_hunyuan_previous_rows(r),
        f"| peak GPU memory | {r['adaspa_peak_bytes'] / gib:.1f} GiB vs {r['dense_peak_bytes'] / gib:.1f} GiB dense | |",
    ])


def _hunyuan_previous_rows(r: dict) -> list[str]:
    """The ``first_lse="previous"`` rows of :func:`markdown_hunyuan` (results that have them)."""
    if "total_50_previous_ms" not in r:
        return []
    c, d = r["schedule_50_previous"], r["dense_ms"]
    return [
        f"| `first_lse=\"previous\"`: dense step keeping its LSE | {r['dense_lse_ms']:.0f} | {r['dense_lse_ms'] / d:.2f}× |",
        f"| `first_lse=\"previous\"`: first search (that LSE; sparse output) | {r['first_research_ms']:.0f} | "
        f"{r['first_research_ms'] / d:.2f}× |",
        f"| **50 steps, `first_lse=\"previous\"`** ({c['dense']} dense, 1 dense_lse, {c['research']} searches, "
        f"{c['sparse']} sparse) | {r['total_50_previous_ms'] / 1e3:.1f} s | speed-up **{r['speedup_50_previous']:.2f}×** |",
    ]


def video_ditfastattn_shapes(r: dict) -> str:
    return (f"{r['model']} transformer, random weights, {r['layers']} attention layers, latent "
            f"{'×'.join(map(str, r['latent']))} = {r['video_tokens']:,} video + {r['text_tokens']} text tokens, "
            f"{r['dtype']}, CFG: {r['cfg']}, window {r['window']} {r['window_size']:g}, caches in "
            f"{'the model dtype' if r.get('cache_dtype', 'model') == 'model' else r['cache_dtype']}; one measured step "
            "of each kind (every layer alike) in plans that fit in memory ("
            + "; ".join(" → ".join(g) for g in r["groups"]) + "), the 50-step plan composed from them")


def markdown_video_ditfastattn(r: dict) -> str:
    d = r["dense_step_ms"]
    gib = 2**30
    c = r["plan_50"]
    calls = "cond + uncond call" if r["cfg"].startswith("two") else "one call"
    rows = [f"| step kind ({calls}) | ms | attention FLOPs | speed-up |", "|---|---|---|---|",
            f"| dense | {d:.0f} | 100% | 1.00× |"]
    if "dense_masked_step_ms" in r:
        rows.append(f"| dense as diffusers runs it (SDPA with the all-True text mask) | "
                    f"{r['dense_masked_step_ms']:.0f} | 100% | {d / r['dense_masked_step_ms']:.2f}× |")
    rows += [f"| {s['kind']} | {s['ms']:.0f} | {100 * s['attention_flops']:.1f}% | {s['speedup']:.2f}× |"
             for s in r["steps"]]
    mix = ", ".join(f"{n} {k}" for k, n in c.items() if n)
    rows += [f"| **50 steps** ({mix}) at {100 * r['attention_flops_50']:.1f}% attention FLOPs | "
             f"{r['total_50_ms'] / 1e3:.1f} s vs {r['dense_50_ms'] / 1e3:.1f} s dense | | **{r['speedup_50']:.2f}×** |"]
    rows += [f"| peak GPU memory, plan {' → '.join(g['kinds'])} | {g['peak_bytes'] / gib:.1f} GiB vs "
             f"{r['dense_peak_bytes'] / gib:.1f} GiB dense (caches {g['cache_bytes_peak'] / gib:.2f} GiB) | | |"
             for g in r["plans"]]
    return "\n".join(rows)


def attention_share_shapes(r: dict) -> str:
    what = (f"latent {'×'.join(map(str, r['latent']))} + {r['text_tokens']} text tokens" if "latent" in r
            else f"{r['tokens']:,} tokens, batch {r['batch']} (the CFG pair)")
    return (f"{r['model']} transformer, random weights, {what}, {r['dtype']}; median of {r['repeats']} steps "
            "dense and with every self-attention core replaced by a no-op")


def markdown_attention_share(r: dict) -> str:
    return "\n".join([
        "| dense step | step without the self-attention cores | attention share |",
        "|---|---|---|",
        f"| {r['dense_ms']:.1f} ms | {r['no_core_ms']:.1f} ms | **{100 * r['share']:.1f}%** |",
    ])


def calibrate_shapes(r: dict) -> str:
    return (f"{r['model']} pipeline, random weights, {r['layers']} layers ({r['heads']} heads × {r['head_dim']}), "
            f"{r['image'][0]}×{r['image'][1]} (latent {r['latent'][0]}×{r['latent'][1]}, {r['tokens']:,} tokens), "
            f"{r['prompts']} calibration prompt(s) as random T5 embeddings ({r['text_tokens']} tokens) with CFG "
            f"(guidance {r['guidance_scale']:g}, batch {r['batch']}), {r['steps']} steps ({r['scheduler']}), "
            f"δ = {r['threshold']} ({r['delta']:g}), window {r['window']} {r['window_size']:g}, {r['dtype']}; no text "
            "encoder, no VAE (`output_type=\"latent\"`)")


def markdown_calibrate(r: dict) -> str:
    """The Markdown table of a ``bench_calibrate`` result: dense generation, then each search."""
    gib = 2**30
    d = r["dense"]
    rows = ["| | steps decided | transformer passes (per step) | wall time | × dense generation | plan's attention "
            "FLOPs | generation with the plan | peak GPU memory |", "|---|---|---|---|---|---|---|---|",
            f"| dense generation | {r['steps']} | {d['passes']} ({d['passes'] / r['steps']:.1f}) | "
            f"{d['seconds']:.1f} s | 1.0× | 100% | | {d['peak_bytes'] / gib:.1f} GiB |"]
    for x in r["searches"]:
        if x["completed"]:
            decided, time = f"{x['steps_decided']}", f"**{x['seconds']:.1f} s**"
            counts = ", ".join(f"{m} {n}" for m, n in x["plan_counts"].items() if n)
            flops = f"{100 * x['attention_flops_ratio']:.1f}% ({counts})"
            plan = f"{x['plan_seconds']:.1f} s ({x['plan_speedup']:.2f}×)"
        else:
            decided = f"{x['steps_decided']} of {r['steps']}: stopped at the {r['greedy_budget_s']:g} s budget"
            time = f"{x['seconds']:.1f} s; all {r['steps']} steps ≈ **{x['estimated_seconds']:.0f} s** (estimated)"
            flops = plan = "—"
        rows.append(f"| `{x['search']}` calibration | {decided} | {x['passes']} ({x['passes_per_step']:.1f}) | "
                    f"{time} | {x['vs_dense']:.1f}× | {flops} | {plan} | {x['peak_bytes'] / gib:.1f} GiB |")
    return "\n".join(rows)
