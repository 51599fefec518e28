"""The registry of ``ditaccel bench all``: one :class:`Case` per benchmark behind numbers in
README.md / BENCHMARKS.md (:data:`CASES`; a new case is one entry), and :func:`run_all`, which
runs them, prints each table and writes it as a Markdown section with its raw JSON (and PNG).
``--dry-run`` runs the same plumbing on the CPU at toy sizes, Triton interpreted where it can be."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
import tempfile
import time
import traceback
from typing import Callable

import torch

from ..cli_support import default_device
from ..kernels.block_sparse import block_sparse_attention
from .kernel_cases import bench_adaspa, bench_attention, bench_sparsity
from .model_cases import (
    TOY_HUNYUAN,
    TOY_PIXART,
    TOY_WAN,
    bench_adaspa_step,
    bench_attention_share,
    bench_calibrate,
    bench_hunyuan_adaspa,
    bench_pixart_plan,
    bench_step,
    bench_sweep,
    bench_video_ditfastattn,
)
from .report import (
    _sweep_title,
    adaspa_shapes,
    adaspa_step_shapes,
    attention_shapes,
    calibrate_shapes,
    attention_share_shapes,
    environment,
    hunyuan_shapes,
    jsonable,
    markdown_adaspa,
    markdown_adaspa_step,
    markdown_attention,
    markdown_attention_share,
    markdown_calibrate,
    markdown_hunyuan,
    markdown_pixart_plan,
    markdown_sparsity,
    markdown_step,
    markdown_sweep,
    markdown_video_ditfastattn,
    missing_matplotlib,
    pixart_plan_shapes,
    plot_sparsity,
    render_section,
    result_stem,
    sparsity_shapes,
    step_shapes,
    update_markdown,
    video_ditfastattn_shapes,
    write_json,
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark behind numbers in README.md / BENCHMARKS.md, run by ``ditaccel bench all``.

    ``run(**kwargs, device=...)`` returns a JSON-able dict; ``table(result)`` is its Markdown
    table, ``shapes(result)`` one line saying what was measured; ``command`` reruns the case
    alone. ``dry_kwargs`` replace entries of ``kwargs`` for ``--dry-run`` (toy sizes, CPU, 2-3
    runs). ``device``: ``"cpu"`` for cases measured on the CPU whatever ``--device`` says (None:
    the run's device); ``needs_cuda``: refused without a GPU unless dry-running. ``plot(result,
    png_path)``, when set, writes a PNG next to the JSON.
    """

    name: str
    run: Callable[..., dict]
    table: Callable[[dict], str]
    shapes: Callable[[dict], str]
    command: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    dry_kwargs: dict = dataclasses.field(default_factory=dict)
    device: str | None = None
    needs_cuda: bool = True
    plot: Callable[[dict, str], None] | None = None

    def arguments(self, device: str, dry_run: bool) -> dict:
        """The keyword arguments of ``run`` for this invocation."""
        kw = {**self.kwargs, **(self.dry_kwargs if dry_run else {})}
        kw["device"] = "cpu" if dry_run else (self.device or device)
        return kw


_TOY_KERNEL = dict(dtype=torch.float32, repeats=2)


_TOY_SWEEP = dict(steps=2, thresholds=("D6",))


def _sweep_case(model: str, search: str) -> Case:
    return Case(f"sweep-{model}-{search}", bench_sweep, markdown_sweep, _sweep_title,
                f"ditaccel bench sweep --model {model} --steps 20 --device cpu --search {search}",
                kwargs=dict(model=model, steps=20, search=search), dry_kwargs=_TOY_SWEEP, device="cpu",
                needs_cuda=False)


#: every case ``ditaccel bench all`` runs, in order. A new case is one entry.
CASES: list[Case] = [
    Case("pixart-sigma-2k-step", bench_step, markdown_step, step_shapes,
         "ditaccel bench step --model pixart-sigma-2k --repeats 5",
         kwargs=dict(model="pixart-sigma-2k", repeats=5, window="band1d"),
         dry_kwargs=dict(dtype=torch.float32, repeats=2, overrides=TOY_PIXART)),
    Case("attention-band1d", bench_attention, markdown_attention, attention_shapes,
         "ditaccel bench attention --tokens 16384 --head-dim 72",
         kwargs=dict(tokens=16384, head_dim=72, window="band1d"),
         dry_kwargs=dict(tokens=256, heads=2, head_dim=16, batch=1, **_TOY_KERNEL)),
    Case("attention-neighborhood2d", bench_attention, markdown_attention, attention_shapes,
         "ditaccel bench attention --tokens 16384 --head-dim 72 --window neighborhood2d",
         kwargs=dict(tokens=16384, head_dim=72, window="neighborhood2d"),
         dry_kwargs=dict(tokens=256, heads=2, head_dim=16, batch=1, **_TOY_KERNEL)),
    Case("adaspa-kernels", bench_adaspa, markdown_adaspa, adaspa_shapes, "ditaccel bench adaspa",
         dry_kwargs=dict(frames=2, rows=4, cols=8, heads=2, head_dim=32, block_size=16, **_TOY_KERNEL)),
    Case("adaspa-wan-1.3b-steps", bench_adaspa_step, markdown_adaspa_step, adaspa_step_shapes,
         "ditaccel bench adaspa-step --repeats 2", kwargs=dict(repeats=2),
         dry_kwargs=dict(frames=2, height=8, width=8, steps=5, dtype=torch.float32, repeats=1, overrides=TOY_WAN)),
    Case("sparsity", bench_sparsity, markdown_sparsity, sparsity_shapes, "ditaccel bench sparsity",
         dry_kwargs=dict(tokens=128, heads=2, head_dim=16, block_size=16, kept=(1.0, 0.25), native_block=32,
                         ours_backend="auto", **_TOY_KERNEL), plot=plot_sparsity),
    Case("attention-cpu", bench_attention, markdown_attention, attention_shapes,
         "ditaccel bench attention --device cpu --tokens 4096 --head-dim 72 --threads 2",
         kwargs=dict(tokens=4096, head_dim=72, window="band1d", dtype=torch.float32, repeats=5),
         dry_kwargs=dict(tokens=256, heads=2, head_dim=16, batch=1, **_TOY_KERNEL), device="cpu", needs_cuda=False),
    *[_sweep_case(model, search) for model in ("tiny-dit", "tiny-pixart") for search in ("greedy", "local")],
    Case("hunyuan-video-720p-adaspa", bench_hunyuan_adaspa, markdown_hunyuan,
         hunyuan_shapes, "ditaccel bench all --only hunyuan-video-720p-adaspa",
         dry_kwargs=dict(frames=2, height=8, width=8, text_tokens=8, block_size=16, dtype=torch.float32,
                         overrides=TOY_HUNYUAN)),
    *[Case(f"attention-share-{m}", bench_attention_share, markdown_attention_share,
           attention_share_shapes, f"ditaccel bench all --only attention-share-{m}",
           kwargs=dict(model=m), dry_kwargs=dict(dtype=torch.float32, repeats=1, video_latent=(2, 8, 8), text_tokens=8,
                                                 overrides=TOY_PIXART if m.startswith("pixart") else
                                                 TOY_HUNYUAN))
      for m in ("pixart-sigma-2k", "hunyuan-video-720p")],
    *[Case(f"{m}-ditfastattn", bench_video_ditfastattn, markdown_video_ditfastattn, video_ditfastattn_shapes,
           f"ditaccel bench all --only {m}-ditfastattn", kwargs=dict(model=m),
           dry_kwargs=dict(latent=(2, 8, 8), text_tokens=8, dtype=torch.float32,
                           overrides=TOY_HUNYUAN if m.startswith("hunyuan") else TOY_WAN))
      for m in ("wan2.1-14b-720p", "hunyuan-video-720p")],
    Case("wan2.1-14b-720p-ditfastattn-float8", bench_video_ditfastattn, markdown_video_ditfastattn,
         video_ditfastattn_shapes, "ditaccel bench all --only wan2.1-14b-720p-ditfastattn-float8",
         kwargs=dict(model="wan2.1-14b-720p", cache_dtype="float8"),
         dry_kwargs=dict(latent=(2, 8, 8), text_tokens=8, dtype=torch.float32, overrides=TOY_WAN)),
    Case("pixart-sigma-2k-plan-50", bench_pixart_plan, markdown_pixart_plan,
         pixart_plan_shapes, "ditaccel bench all --only pixart-sigma-2k-plan-50",
         dry_kwargs=dict(steps=12, dtype=torch.float32, overrides=TOY_PIXART)),
    Case("calibrate-pixart-sigma-2k", bench_calibrate, markdown_calibrate, calibrate_shapes,
         "ditaccel bench all --only calibrate-pixart-sigma-2k", kwargs=dict(greedy_budget_s=100.0),
         dry_kwargs=dict(steps=3, text_tokens=8, dtype=torch.float32, overrides=TOY_PIXART)),
]


@contextlib.contextmanager
def _environ(name: str, value: str):
    """``os.environ[name] = value`` inside the block, the old value (or its absence) back after it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _triton_interpreter(enabled: bool):
    """``TRITON_INTERPRET=1`` inside the block when ``enabled``.

    The repo's kernels read the variable at launch, so setting it here, before the first launch,
    runs them (backend ``"auto"`` / ``"triton"``) in Triton's CPU interpreter. ``triton.language``
    is imported first (by the probe): imported while the variable is set, Triton's own helpers
    would stay interpreted and no CUDA kernel could be compiled later in the process (e.g. in a
    test session). Without Triton, or where its interpreter cannot run the kernels (Triton 3.6
    with numpy >= 2.5), the variable is left alone and ``"auto"`` picks the PyTorch references.
    """
    problem = _interpreter_problem() if enabled else None
    if problem:
        print(f"ditaccel bench: {problem}: the dry run uses the PyTorch reference kernels", file=sys.stderr)
    with _environ("TRITON_INTERPRET", "1") if enabled and not problem else contextlib.nullcontext():
        yield


def _interpreter_problem() -> str | None:
    """None if Triton's interpreter runs the block-sparse kernel on a tiny input, else why not."""
    try:
        import triton.language  # noqa: F401  (is Triton installed?)
    except ImportError:
        return "Triton is not installed"
    q = torch.zeros(1, 1, 16, 16)
    idx, cnt = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    try:
        with _environ("TRITON_INTERPRET", "1"):
            block_sparse_attention(q, q, q, idx, cnt, block_size=16, backend="triton")
    except Exception as e:  # noqa: BLE001 - whatever the failure, the kernels cannot be interpreted here
        return f"Triton's interpreter cannot run the kernels here ({type(e).__name__}: {str(e)[:120]})"
    return None


def select_cases(only: str | None) -> list[Case]:
    if only is None:
        return list(CASES)
    by_name = {c.name: c for c in CASES}
    names = list(dict.fromkeys(n.strip() for n in only.split(",") if n.strip()))
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ValueError(f"--only: unknown case(s) {', '.join(map(repr, unknown)) or '(none given)'}; known: "
                         f"{', '.join(by_name)}")
    return [by_name[n] for n in names]


def run_all(only: str | None = None, device: str | None = None, dry_run: bool = False, out_md: str | None = None,
            results_dir: str | None = None) -> int:
    """Run the selected :data:`CASES` (``only``: comma-separated names; default all), print each
    table, write it as a section of ``out_md`` and its raw JSON (and PNG) to ``results_dir``.

    Real runs default to ``BENCHMARKS.md`` and ``docs/results`` (relative to the current
    directory: run from the repository root); a dry run (toy sizes, CPU, Triton interpreted) to a
    fresh temporary folder. A case that raises is reported and skipped, the others still run.
    Returns 0, or 1 if a case failed; bad arguments raise ``ValueError``.
    """
    selected = select_cases(only)
    if dry_run and device not in (None, "cpu"):
        raise ValueError(f"--device {device}: --dry-run runs on the CPU; leave --device out")
    device = "cpu" if dry_run else (device or default_device())
    if not dry_run and not device.startswith("cuda"):
        gpu = [c.name for c in selected if c.needs_cuda]
        if gpu:
            cpu = [c.name for c in CASES if not c.needs_cuda]
            raise ValueError(f"--device {device}: case(s) {', '.join(gpu)} need a CUDA GPU; select CPU cases with "
                             f"--only ({', '.join(cpu)}) or check the plumbing with --dry-run")
    if dry_run:
        out_md = out_md or os.path.join(tempfile.mkdtemp(prefix="ditaccel-bench-dry-run-"), "BENCHMARKS.md")
        results_dir = results_dir or os.path.join(os.path.dirname(os.path.abspath(out_md)), "results")
    else:
        out_md = out_md or "BENCHMARKS.md"
        results_dir = results_dir or os.path.join("docs", "results")
    md_dir = os.path.dirname(os.path.abspath(out_md))
    no_plot = missing_matplotlib() if any(c.plot for c in selected) else None
    if no_plot:
        print(f"ditaccel bench: {no_plot}", file=sys.stderr)
    date = datetime.date.today().isoformat()
    failed = []
    with _triton_interpreter(dry_run):
        for case in selected:
            command = f"ditaccel bench all --dry-run --only {case.name}" if dry_run else case.command
            print(f"\n== {case.name}: {command}", flush=True)
            kwargs = case.arguments(device, dry_run)
            t0 = time.perf_counter()
            try:
                result = case.run(**kwargs)
                table, shapes = case.table(result), case.shapes(result)
            except Exception:  # noqa: BLE001 - one broken case must not lose the other cases' measurements
                traceback.print_exc()
                failed.append(case.name)
                continue
            seconds = time.perf_counter() - t0
            env = environment(kwargs["device"], date)
            stem = result_stem(results_dir, env, case.name)
            files = [stem + ".json"]
            if case.plot and not no_plot:
                case.plot(result, stem + ".png")
                files.append(stem + ".png")
            write_json(files[0], {"case": case.name, "command": command, "dry_run": dry_run, "environment": env,
                                  "kwargs": jsonable(kwargs), "seconds": seconds, "result": result})
            links = [os.path.relpath(os.path.abspath(f), md_dir) for f in files]
            update_markdown(out_md, case.name, render_section(case.name, env, shapes, command, table, links, dry_run))
            print(f"{shapes}\n\n{table}\n\n({seconds:.1f} s) wrote {', '.join(files)}", flush=True)
    print(f"\n{len(selected) - len(failed)} of {len(selected)} case(s) written to {out_md}; raw results in "
          f"{results_dir}")
    if failed:
        print(f"ditaccel bench: failed: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
        return 1
    return 0
