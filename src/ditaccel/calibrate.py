"""Plan search: the paper's greedy per-(step, layer) algorithm, run inside the real pipeline.

For each denoising step t in order, the transformer is run with every layer ``full`` (on the
already-compressed history) to get O. Then for each layer i in order the candidates are tried,
most compressing first, with layers < i at their chosen methods and layers > i ``full``; the
first candidate with L(O, O') < (i + 1) / n_layers · δ is kept (L: ``config.loss``). The step then
runs once more with the chosen column, which is what the pipeline sees and what the caches of
later steps hold.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from tqdm.auto import tqdm

from .methods.adaspa import SCHEDULE_FIELDS, SEARCH, SPARSE
from .methods.ditfastattn import ASC, FULL, WARS_ASC, DiTFastAttn, DiTFastAttnConfig, loss_function
from .methods.mixed import MixedPlan
from .models import adapter_for
from .plan import Plan, new_metadata
from .processors import CALL_KINDS
from .runtime import get_runtime, install, remove, split_target

_HOOK = "ditaccel-calibrate"


def _sample(output) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


@dataclass
class _FirstCall:
    """The first of a step's two CFG calls (CFG run as separate calls), waiting for the other one."""

    step: int
    branch: str
    context: object  # its cache context, to run it again in its own CFG-branch state
    args: tuple
    kwargs: dict
    output: object  # what it returned: the all-full output, overwritten in place once the step is decided
    reference: torch.Tensor
    scores: dict


class _GreedySearchHook(ModelHook):
    """Outermost hook during calibration: turns each transformer call into the greedy search.

    Where CFG runs as two transformer calls per step (each in its own cache context), a step is
    decided once both calls are known, with the loss over both outputs (as over both halves of a
    CFG batch): the first call returns its all-full output and waits; the second call searches
    with both (each trial runs the first call again in its own branch state, then the second),
    then runs the chosen column for both and overwrites the first call's output in place with its
    result (diffusers' pipelines combine the two outputs only after the second call)."""

    pair: _FirstCall | None = None  # while a step of two CFG calls is decided: its first call

    def __init__(self, runtime, method: DiTFastAttn, config: DiTFastAttnConfig, bar, candidates: tuple[str, ...]):
        super().__init__()
        self.runtime, self.method, self.config, self.bar = runtime, method, config, bar
        self.candidates = candidates
        self.loss = loss_function(config.loss)
        self.columns: dict[int, list[str]] = {}
        self.losses: dict[int, float] = {}
        self.cfg_seen = False
        self.grid: tuple[int, int] | None = None
        self.first: _FirstCall | None = None  # the first CFG call of a step, waiting for the second

    def _run(self, column, write, args, kwargs, context=None):
        self.method.trial, self.method.write = column, write
        if context is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        states = self.runtime.state_manager
        current = states._context
        states.set_context(context)  # the other call's CFG-branch state
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            states.set_context(current)

    def _trial(self, column, args, kwargs) -> torch.Tensor:
        """The output of a trial column (both CFG calls of the step, where CFG runs as two)."""
        if self.pair is None:
            return _sample(self._run(column, False, args, kwargs))
        first = _sample(self._run(column, False, self.pair.args, self.pair.kwargs, self.pair.context))
        return torch.cat([first, _sample(self._run(column, False, args, kwargs))])  # in the pipeline's order

    def _greedy(self, reference, allowed, args, kwargs) -> list[str]:
        """The paper: layer by layer, the first candidate whose whole-transformer loss is in budget."""
        n = len(self.method.methods)
        full = [FULL] * n
        chosen = list(full)
        for i in range(n):
            budget = (i + 1) / n * self.config.threshold
            for cand in allowed:
                trial = chosen[:i] + [cand] + full[i + 1:]
                if self.loss(reference, self._trial(trial, args, kwargs)) < budget:
                    chosen[i] = cand
                    break
            self.bar.update(1)
        return chosen

    def _local(self, reference, allowed, scores, args, kwargs) -> list[str]:
        """Candidates scored on each layer's own output (``scores[layer][candidate]``, from the
        reference pass); a layer takes its first candidate scoring under a common level τ, and τ
        is the largest one (binary search over the scores) whose column keeps the transformer
        output within δ. About log2(layers × candidates) passes per step."""
        n = len(self.method.methods)

        def column(tau):
            return [next((c for c in allowed if scores[i][c] <= tau), FULL) for i in range(n)]

        levels = sorted({v for i in range(n) for v in scores[i].values()})
        best, lo, hi = [FULL] * n, 0, len(levels) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = column(levels[mid])
            if self.loss(reference, self._trial(trial, args, kwargs)) < self.config.threshold:
                best, lo = trial, mid + 1
            else:
                hi = mid - 1
        self.bar.update(n)
        return best

    def _search(self, ctx, reference, scores, args, kwargs) -> list[str]:
        cfg = ctx.cond is not None or self.pair is not None
        allowed = [c for c in self.candidates if cfg or c not in (ASC, WARS_ASC)]
        if self.config.search == "local":
            return self._local(reference, allowed, scores, args, kwargs)
        return self._greedy(reference, allowed, args, kwargs)

    def new_forward(self, module, *args, **kwargs):
        n = len(self.method.methods)
        full = [FULL] * n
        if self.config.search == "local":  # score candidates per layer during the reference pass
            self.method.scoring, self.method.scores = self.candidates, {}
        try:
            ref_out = self._run(full, False, args, kwargs)
        finally:
            self.method.scoring = None
        reference, scores = _sample(ref_out), self.method.scores
        ctx = self.runtime.last_ctx
        two_calls = ctx.cond is None and ctx.branch is not None and ctx.branches >= 2
        self.cfg_seen |= ctx.cond is not None or two_calls
        self.grid = ctx.grid
        first = self.first
        if first is not None and (first.step != ctx.step or first.branch == ctx.branch):
            raise RuntimeError(f"calibration: step {first.step} made one CFG call ({first.branch!r}) where step 0 "
                               f"made {ctx.branches}; a pipeline must make the same calls at every step")
        if first is not None:  # the second CFG call: decide the step with both
            self.first, self.pair = None, first
            try:
                reference = torch.cat([first.reference, reference])
                if self.config.search == "local":  # a candidate's score: the mean over both calls
                    scores = {i: {c: (first.scores[i][c] + v) / 2 for c, v in s.items() if c in first.scores[i]}
                              for i, s in scores.items()}
                chosen = self._search(ctx, reference, scores, args, kwargs)
            finally:
                self.pair = None
            done = _sample(self._run(chosen, True, first.args, first.kwargs, first.context))
            _sample(first.output).copy_(done)  # what the first call returns, now that the step is decided
            out = self._run(chosen, True, args, kwargs)
            self.columns[ctx.step] = chosen
            self.losses[ctx.step] = self.loss(reference, torch.cat([done, _sample(out)]))
            return out
        if two_calls and ctx.step > 0 and ctx.step not in self.columns:  # the first CFG call: wait for the other
            self.first = _FirstCall(ctx.step, ctx.branch, self.runtime.state_manager._context, args, kwargs, ref_out,
                                    reference, scores)
            return ref_out
        chosen = list(full)
        if ctx.step > 0 and ctx.step not in self.columns:
            chosen = self._search(ctx, reference, scores, args, kwargs)
        elif ctx.step in self.columns:  # same step again: reuse
            chosen = self.columns[ctx.step]
        else:
            self.bar.update(n)
        out = self._run(chosen, True, args, kwargs)
        if ctx.step not in self.columns:
            self.columns[ctx.step] = chosen
            self.losses[ctx.step] = self.loss(reference, _sample(out))
        return out


def with_searches(row: list[str]) -> list[str]:
    """One layer's calibrated row as a mixed plan: the ``full`` step whose mask a ``sparse`` run
    used (during calibration every written ``full`` step searched one; the run reads the layer's
    latest) becomes ``"search"``. Step 0 is always ``full``, so every sparse run has one."""
    row = list(row)
    for s, m in enumerate(row):
        if m == SPARSE:
            j = max(i for i in range(s) if row[i] in (FULL, SEARCH))
            row[j] = SEARCH
    return row


def calibrate(pipe, config: DiTFastAttnConfig | None = None, num_inference_steps: int = 20,
              **pipe_call_kwargs) -> Plan:
    """Search a DiTFastAttn plan for ``pipe`` by running it once on the calibration inputs.

    Where the pipeline runs CFG as two transformer calls per step (Wan; Flux and HunyuanVideo with
    ``true_cfg_scale > 1``), each step is decided on both calls' outputs (see ``_GreedySearchHook``).

    Args:
        pipe: a diffusers pipeline (DiT, PixArt-Sigma, Wan, HunyuanVideo, CogVideoX, Flux, ...)
            without ditaccel applied.
        config: the search settings (threshold δ, window, search, loss); default ``DiTFastAttnConfig()``.
        num_inference_steps: the step count the plan is made for (plans are per step count).
        **pipe_call_kwargs: the calibration inputs and call settings, passed to ``pipe(...)``:
            e.g. ``class_labels=[...]`` (the paper: 8 labels) for DiT, ``prompt=[...]`` (6 captions)
            for PixArt, ``guidance_scale``, ``generator``. ``output_type`` defaults to "latent".
    Returns:
        the ``Plan`` (``methods[layer][step]``) with its metadata.
    """
    config = DiTFastAttnConfig() if config is None else config
    if not isinstance(config, DiTFastAttnConfig):
        raise TypeError(f"config must be a DiTFastAttnConfig, got {type(config).__name__}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    pipe_obj, transformer = split_target(pipe)
    if pipe_obj is None:
        raise TypeError("calibrate needs a pipeline (it runs the denoising loop); got a bare transformer")
    if get_runtime(transformer) is not None:
        raise RuntimeError("ditaccel is applied to this pipeline; call ditaccel.remove(pipe) before calibrating")
    adapter = adapter_for(transformer)
    n_layers = len(adapter.attention_modules(transformer))
    runnable = CALL_KINDS[adapter.attention_call].methods
    # never offer what the family cannot run (AdaSpa's sparse attention runs at every family's core)
    candidates = tuple(c for c in config.candidates if c in runnable or c == SPARSE)
    if "output_type" in inspect.signature(type(pipe).__call__).parameters:
        pipe_call_kwargs.setdefault("output_type", "latent")

    rows = [[FULL] * num_inference_steps for _ in range(n_layers)]
    if SPARSE in candidates:  # mixed: every written full step also searches a mask for later sparse trials
        method = MixedPlan(rows, config.window, config.window_size, config.residual_refresh, config.adaspa,
                           config.cache_dtype)
        method.search_full_steps = True
    else:
        method = DiTFastAttn(rows, config.window, config.window_size, config.residual_refresh, config.cache_dtype)
    method.trial = [FULL] * n_layers
    method.score_loss = loss_function(config.loss)
    runtime = install(pipe, method, cfg=config.cfg)
    bar = tqdm(total=num_inference_steps * n_layers, desc="ditaccel calibrate", unit="layer",
               disable=not config.show_progress)
    hook = _GreedySearchHook(runtime, method, config, bar, candidates)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(hook, _HOOK)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            pipe(num_inference_steps=num_inference_steps, **pipe_call_kwargs)
    finally:
        bar.close()
        registry.remove_hook(_HOOK, recurse=False)
        remove(pipe)
    missing = [s for s in range(num_inference_steps) if s not in hook.columns]
    if missing:
        raise RuntimeError(f"calibration saw no transformer call for steps {missing}; does the pipeline run "
                           f"num_inference_steps={num_inference_steps} steps?")
    grid = hook.grid
    methods = [with_searches([hook.columns[s][i] for s in range(num_inference_steps)]) for i in range(n_layers)]
    mixed = {}
    if any(SPARSE in row for row in methods):
        mixed["adaspa"] = {k: v for k, v in dataclasses.asdict(config.adaspa).items() if k not in SCHEDULE_FIELDS}
    batch = pipe_call_kwargs.get("class_labels", pipe_call_kwargs.get("prompt"))
    md = new_metadata(
        transformer, num_inference_steps, bool(hook.cfg_seen), config.window, config.window_size,
        num_layers=n_layers,
        scheduler=type(pipe.scheduler).__name__,
        grid=list(grid) if grid else None,
        tokens=grid[0] * grid[1] if grid else None,
        threshold=config.threshold,
        candidates=list(candidates),
        search=config.search,
        loss=config.loss,
        residual_refresh=config.residual_refresh,
        cache_dtype=config.cache_dtype,
        calibration_inputs=len(batch) if isinstance(batch, (list, tuple)) else 1,
        calibration_seconds=round(time.perf_counter() - t0, 3),
        step_loss=[round(hook.losses[s], 6) for s in range(num_inference_steps)],
        **mixed,
    )
    return Plan(methods, md)

