"""Plan search: the paper's greedy per-(step, layer) algorithm, run inside the real pipeline.

For each denoising step t in order, the transformer is run with every layer ``full`` (on the
already-compressed history) to get O. Then for each layer i in order the candidates are tried,
most compressing first, with layers < i at their chosen methods and layers > i ``full``; the
first candidate with L(O, O') < (i + 1) / n_layers · δ is kept (L: ``config.loss``). The step then
runs once more with the chosen column, which is what the pipeline sees and what the caches of
later steps hold.
"""

from __future__ import annotations

import inspect
import time

import torch
from diffusers.hooks import HookRegistry, ModelHook
from tqdm.auto import tqdm

from .methods.ditfastattn import ASC, FULL, WARS_ASC, DiTFastAttn, DiTFastAttnConfig, loss_function
from .models import adapter_for
from .plan import Plan, new_metadata
from .runtime import get_runtime, install, remove, split_target

_HOOK = "ditaccel-calibrate"


def _sample(output) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


class _GreedySearchHook(ModelHook):
    """Outermost hook during calibration: turns each transformer call into the greedy search."""

    def __init__(self, runtime, method: DiTFastAttn, config: DiTFastAttnConfig, bar):
        super().__init__()
        self.runtime, self.method, self.config, self.bar = runtime, method, config, bar
        self.loss = loss_function(config.loss)
        self.columns: dict[int, list[str]] = {}
        self.losses: dict[int, float] = {}
        self.cfg_seen: bool | None = None
        self.grid: tuple[int, int] | None = None

    def _run(self, column, write, args, kwargs):
        self.method.trial, self.method.write = column, write
        return self.fn_ref.original_forward(*args, **kwargs)

    def _greedy(self, reference, allowed, args, kwargs) -> list[str]:
        """The paper: layer by layer, the first candidate whose whole-transformer loss is in budget."""
        n = len(self.method.methods)
        full = [FULL] * n
        chosen = list(full)
        for i in range(n):
            budget = (i + 1) / n * self.config.threshold
            for cand in allowed:
                trial = chosen[:i] + [cand] + full[i + 1:]
                if self.loss(reference, _sample(self._run(trial, False, args, kwargs))) < budget:
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
            if self.loss(reference, _sample(self._run(trial, False, args, kwargs))) < self.config.threshold:
                best, lo = trial, mid + 1
            else:
                hi = mid - 1
        self.bar.update(n)
        return best

    def new_forward(self, module, *args, **kwargs):
        n = len(self.method.methods)
        full = [FULL] * n
        if self.config.search == "local":  # score candidates per layer during the reference pass
            self.method.scoring, self.method.scores = self.config.candidates, {}
        try:
            reference = _sample(self._run(full, False, args, kwargs))
        finally:
            self.method.scoring = None
        ctx = self.runtime.last_ctx
        self.cfg_seen = ctx.cond is not None if self.cfg_seen is None else self.cfg_seen
        self.grid = ctx.grid
        chosen = list(full)
        if ctx.step > 0 and ctx.step not in self.columns:
            allowed = [c for c in self.config.candidates if ctx.cond is not None or c not in (ASC, WARS_ASC)]
            if self.config.search == "local":
                chosen = self._local(reference, allowed, self.method.scores, args, kwargs)
            else:
                chosen = self._greedy(reference, allowed, args, kwargs)
        elif ctx.step in self.columns:  # same step again (e.g. a separate CFG call): reuse
            chosen = self.columns[ctx.step]
        else:
            self.bar.update(n)
        out = self._run(chosen, True, args, kwargs)
        if ctx.step not in self.columns:
            self.columns[ctx.step] = chosen
            self.losses[ctx.step] = self.loss(reference, _sample(out))
        return out


def calibrate(pipe, config: DiTFastAttnConfig | None = None, num_inference_steps: int = 20,
              **pipe_call_kwargs) -> Plan:
    """Search a DiTFastAttn plan for ``pipe`` by running it once on the calibration inputs.

    Args:
        pipe: a diffusers pipeline (DiT, PixArt-Sigma, ...) without ditaccel applied.
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
    n_layers = len(adapter_for(transformer).attention_modules(transformer))
    if "output_type" in inspect.signature(type(pipe).__call__).parameters:
        pipe_call_kwargs.setdefault("output_type", "latent")

    method = DiTFastAttn([[FULL] * num_inference_steps for _ in range(n_layers)], config.window, config.window_size)
    method.trial = [FULL] * n_layers
    method.score_loss = loss_function(config.loss)
    runtime = install(pipe, method, cfg=config.cfg)
    bar = tqdm(total=num_inference_steps * n_layers, desc="ditaccel calibrate", unit="layer",
               disable=not config.show_progress)
    hook = _GreedySearchHook(runtime, method, config, bar)
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
    methods = [[hook.columns[s][i] for s in range(num_inference_steps)] for i in range(n_layers)]
    batch = pipe_call_kwargs.get("class_labels", pipe_call_kwargs.get("prompt"))
    md = new_metadata(
        transformer, num_inference_steps, bool(hook.cfg_seen), config.window, config.window_size,
        num_layers=n_layers,
        scheduler=type(pipe.scheduler).__name__,
        grid=list(grid) if grid else None,
        tokens=grid[0] * grid[1] if grid else None,
        threshold=config.threshold,
        candidates=list(config.candidates),
        search=config.search,
        loss=config.loss,
        calibration_inputs=len(batch) if isinstance(batch, (list, tuple)) else 1,
        calibration_seconds=round(time.perf_counter() - t0, 3),
        step_loss=[round(hook.losses[s], 6) for s in range(num_inference_steps)],
    )
    return Plan(methods, md)

