"""The runtime: install/remove, step and CFG-branch tracking, per-generation state and stats.

Built on ``diffusers.hooks``: one stateful ``ModelHook`` on the transformer reads the timestep of
each call, maps it to the denoising step and detects the CFG layout; per-layer processors
(``ditaccel.processors``) hand each self-attention call to the method. State lives in a
``StateManager`` (one state per CFG branch context), is reset whenever the pipeline starts a
generation (``scheduler.set_timesteps``), and belongs to one transformer only. What the branch
states of one generation share (which branches call at each step, and the slots in which the first
CFG call of a step leaves work for the other: DiTFastAttn's ``asc`` where CFG runs as two calls)
lives in one ``CrossBranchState`` beside them, reset and freed with them.

Under ``torch.compile`` (of the transformer, or ``transformer.compile()``): everything that
decides per call (the timestep's step, the CFG layout, the state and its caches, the method's
choice for a layer) runs outside the compiled code, as in diffusers' own cache hooks: the hook's
``begin_call`` / ``end_call`` and each ditaccel attention processor call are
``torch.compiler.disable``-d, so Dynamo breaks the graph around them and compiles the rest of the
transformer (norms, MLPs, cross-attention, embeddings) once; no compiled code reads the step, so
no step recompiles it (``tests/test_compile.py`` counts).
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from .models import ModelAdapter, adapter_for
from .parallel import check_model as check_parallelism, input_shards
from .processors import CALL_KINDS, DiTAccelAttnProcessor, patch_core, unpatch_core

HOOK_NAME = "ditaccel"
_OWN_CONTEXT = "ditaccel:batch"


@dataclass
class StepContext:
    """What the hook knows about the current transformer call."""

    step: int
    timestep: float
    cond: int | None  # index of the conditional half in a CFG-batched call, else None
    grid: tuple[int, int]
    batch_size: int
    text_tokens: int = 0  # text tokens in the self-attention sequence (joint attention)
    text_position: str | None = None  # "prefix" or "suffix"
    frames: int = 1  # video: latent frames (after temporal patching) stacked in the grid's rows
    #: families whose pipelines run CFG as separate calls (no ``cfg_batch_order``): the cache context
    #: of this call ("cond", "uncond", ...: its CFG-branch state); None outside a pipeline's context
    branch: str | None = None
    #: how many branches called the transformer at step 0 of this generation (2: CFG as two calls per
    #: step; known from step 1 on, at step 0 those seen so far)
    branches: int = 1
    #: per-layer state the branches of one generation share (``CrossBranchState.slots``), for a method
    #: whose calls of one step depend on each other (DiTFastAttn's asc across separate CFG calls)
    shared: dict | None = field(default=None, repr=False, compare=False)


class CrossBranchState:
    """What the CFG-branch states of one generation share: which branches called at step 0, and
    the method's per-step slots (values with ``nbytes()``); dropped with the generation."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.slots: dict = {}
        self.step0_branches: set = set()
        self.last_step = -1

    def see(self, step: int, branch: str | None) -> int:
        """Record a call of ``branch`` at ``step``; the number of branches seen at step 0."""
        if step == 0 and self.last_step > 0:  # a bare transformer starts a new generation
            self.reset()
        self.last_step = max(self.last_step, step)
        if step == 0:
            self.step0_branches.add(branch)
        return max(1, len(self.step0_branches))

    def nbytes(self) -> int:
        return sum(v.nbytes() for v in self.slots.values())

    def release(self):
        self.slots.clear()


class GenerationState(BaseState):
    """Everything one generation accumulates; dropped when the next one starts."""

    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs):
        self.step = -1
        self.last_t: float | None = None
        self.ctx: StepContext | None = None
        self.caches: dict[int, object] = {}
        self.counts: Counter = Counter()
        self.flops_dense = 0.0
        self.flops_done = 0.0
        self.flops_by_method: Counter = Counter()
        self.steps_seen: set[int] = set()
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.cache_bytes_peak = 0


@dataclass
class Stats:
    """Accounting of the last generation (see ``ditaccel.stats``).

    Dense attention FLOPs count every token of each attention call's sequence (text included for
    joint attention) and every head. Under diffusers' context parallelism the FLOPs, their ratio
    and the method counts are those of the whole computation, the same on every rank and equal to
    one process's; ``denoise_seconds`` and ``cache_bytes_peak`` are this rank's
    (``ditaccel.parallel``)."""

    method: str
    steps: int
    attention_flops_ratio: float  # attention FLOPs done / dense attention FLOPs
    method_counts: dict[str, int]  # (layer, call) pairs per method
    denoise_seconds: float  # first transformer call start → last call end
    cache_bytes_peak: int
    attention_tflops_dense: float = field(default=0.0)
    #: attention FLOPs done per method name, as fractions of the dense FLOPs (they sum to the ratio)
    attention_flops_by_method: dict[str, float] = field(default_factory=dict)
    #: method-specific, over every CFG branch state (``AdaSpa.details``: density, recall, search time;
    #: where CFG runs as separate cond / uncond calls, e.g. Wan, density is their mean, recalls list both
    #: branches' searches and search time is their sum)
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.method_counts.items()))
        return (f"{self.method}: {self.steps} steps, attention FLOPs {100 * self.attention_flops_ratio:.1f}% of dense "
                f"({self.attention_tflops_dense:.3g} TFLOP dense), methods [{counts}], "
                f"denoising {self.denoise_seconds:.3f} s, peak cache {self.cache_bytes_peak / 2**20:.1f} MiB")


class Runtime:
    """Per-transformer runtime. ``method`` decides what each layer does (see methods/)."""

    def __init__(self, transformer: torch.nn.Module, adapter: ModelAdapter, method, cfg: bool | None = None):
        self.transformer, self.adapter, self.method, self.cfg = transformer, adapter, method, cfg
        self.state_manager = StateManager(GenerationState)
        self.cross = CrossBranchState()
        self.schedule: torch.Tensor | None = None  # the scheduler's timesteps, when known
        self.originals: list = []
        self.scheduler = None
        self.last_ctx: StepContext | None = None  # of the latest transformer call
        self._sig = inspect.signature(type(transformer).forward)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> GenerationState:
        return self.state_manager.get_state()

    def reset(self):
        self.state_manager.reset()
        self.cross.reset()

    def release(self):
        """Free every cached tensor but keep what ``stats`` reports."""
        for st in self.state_manager._state_cache.values():
            for cache in st.caches.values():
                cache.release()
        self.cross.release()

    def on_set_timesteps(self, timesteps: torch.Tensor):
        """The pipeline starts a generation: drop all state, learn the schedule."""
        self.reset()
        self.schedule = timesteps.detach().to("cpu", torch.float64).flatten()
        self.method.check_num_steps(len(self.schedule))

    @torch.compiler.disable
    def begin_call(self, args, kwargs):
        bound = self._sig.bind_partial(self.transformer, *args, **kwargs).arguments
        t, hs = bound.get(self.adapter.timestep_arg), bound.get("hidden_states")
        if t is None or hs is None:
            raise ValueError(f"ditaccel needs the transformer's hidden_states and {self.adapter.timestep_arg!r} arguments")
        check_parallelism(self.transformer, self.adapter)  # parallelism may be enabled after apply
        ctx = self.state_manager._context
        if ctx is None or ctx.name.startswith("ditaccel:"):
            self.state_manager.set_context(CacheContext(_OWN_CONTEXT))
        name = self.state_manager._context.name
        branch = None if self.adapter.cfg_batch_order is not None or name == _OWN_CONTEXT else name
        st = self.state
        tval = (t.flatten()[0] if torch.is_tensor(t) else torch.tensor(t)).item() / self.adapter.timestep_scale
        step = self._step_of(st, tval)
        if st.t_start is None or step < st.step:  # the first call of a generation
            st.reset()
            st.t_start = time.perf_counter()
            step = max(step, 0)
        st.step, st.last_t = step, tval
        grid, (text, position) = self.adapter.token_grid(self.transformer, hs), self.adapter.text_layout(bound)
        shards = input_shards(self.transformer, HOOK_NAME)
        if shards > 1:  # this hook sees this rank's shard of the (packed) text and image tokens: describe them all
            grid, text = (grid[0], grid[1] * shards), text * shards
        branches = self.cross.see(step, branch)
        st.ctx = StepContext(step, tval, self._cond_index(hs, bound), grid, hs.shape[0], text, position,
                             self.adapter.token_frames(self.transformer, hs), branch, branches, self.cross.slots)
        st.steps_seen.add(step)
        self.last_ctx = st.ctx
        self.method.begin_call(st.ctx)

    @torch.compiler.disable
    def end_call(self, output):
        st = self.state
        dev = next(self.transformer.parameters()).device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        st.t_end = time.perf_counter()
        if self.state_manager._context is not None and self.state_manager._context.name == _OWN_CONTEXT:
            self.state_manager.set_context(None)
        return output

    def _step_of(self, st: GenerationState, t: float) -> int:
        tol = 1e-4 * max(1.0, abs(t))
        if self.schedule is not None:
            diff = (self.schedule - t).abs()
            i = int(diff.argmin())
            if diff[i] <= tol:
                return i
            raise ValueError(f"timestep {t} is not in the scheduler's timesteps; ditaccel maps timesteps to steps "
                             "through pipe.scheduler (call set_timesteps before denoising)")
        # bare transformer: steps are distinct timesteps in decreasing order
        if st.last_t is None or t > st.last_t + tol:
            return -1  # below any step: a new generation
        return st.step if abs(t - st.last_t) <= tol else st.step + 1

    def _cond_index(self, hs: torch.Tensor, bound) -> int | None:
        order = self.adapter.cfg_batch_order
        if order is None:
            return None
        b = hs.shape[0]
        cfg = self.cfg
        if cfg is None:
            cfg = b % 2 == 0 and torch.equal(hs[: b // 2], hs[b // 2:]) and self._cfg_conditioning(bound, b)
        elif cfg and b % 2:
            raise ValueError(f"cfg=True but the transformer got an odd batch of {b}")
        return self.adapter.cond_index() if cfg else None

    def _cfg_conditioning(self, bound, b: int) -> bool:
        """Whether the conditioning of a batch with identical latent halves is that of a CFG pair
        (the adapter's ``cfg_cond_arg`` / ``cfg_null_label_attr``): the halves differ and, where the
        family has a null class, the unconditional half is all null labels and the conditional
        half has none. A batch of samples sharing their noise but not their labels or prompts is
        then not CFG (``asc`` would copy one sample's attention into another). Without the
        argument (or with no ``cfg_cond_arg``): the latents decide alone."""
        ad = self.adapter
        c = bound.get(ad.cfg_cond_arg) if ad.cfg_cond_arg else None
        if not torch.is_tensor(c) or c.ndim == 0 or c.shape[0] != b:
            return True
        halves = (c[: b // 2], c[b // 2:])
        if torch.equal(*halves):
            return False  # the same sample twice, not a cond / uncond pair
        if ad.cfg_null_label_attr:
            null = getattr(self.transformer.config, ad.cfg_null_label_attr, None)
            if null is not None:
                i = ad.cond_index()
                return bool((halves[1 - i] == null).all() and (halves[i] != null).all())
        return True

    # ------------------------------------------------------------------ per layer
    def attention(self, layer: int, call, dense_flops: float):
        st = self.state
        cache = st.caches.get(layer)
        if cache is None:
            cache = st.caches[layer] = self.method.new_cache()
        out, fraction, name = self.method.attention(st.ctx, layer, call, cache)
        st.counts[name] += 1
        st.flops_dense += dense_flops
        st.flops_done += fraction * dense_flops
        st.flops_by_method[name] += fraction * dense_flops
        # every branch's caches at once: with CFG as two calls both branches hold theirs
        nbytes = sum(c.nbytes() for s in self.state_manager._state_cache.values() for c in s.caches.values())
        st.cache_bytes_peak = max(st.cache_bytes_peak, nbytes + self.cross.nbytes())
        return out

    def stats(self) -> Stats:
        states = list(self.state_manager._state_cache.values())
        if not states or not any(s.flops_dense for s in states):
            raise RuntimeError("ditaccel.stats: no generation has run since ditaccel.apply (or since the last reset)")
        dense = sum(s.flops_dense for s in states)
        counts, by_method = Counter(), Counter()
        for s in states:
            counts.update(s.counts)
            by_method.update(s.flops_by_method)
        return Stats(
            method=self.method.name,
            steps=max(len(s.steps_seen) for s in states),
            attention_flops_ratio=sum(s.flops_done for s in states) / dense,
            method_counts=dict(counts),
            denoise_seconds=max(s.t_end - s.t_start for s in states if s.t_end is not None),
            cache_bytes_peak=max(s.cache_bytes_peak for s in states),
            attention_tflops_dense=dense / 1e12,
            attention_flops_by_method={k: v / dense for k, v in sorted(by_method.items())},
            details=self.method.details([s.caches for s in states if s.flops_dense])
            if hasattr(self.method, "details") else {},
        )

    # ------------------------------------------------------------------ install / remove
    def install(self, scheduler=None):
        mods = self.adapter.attention_modules(self.transformer)
        self.method.check_num_layers(len(mods))
        self.originals = [m.processor for m in mods]
        attr = getattr(CALL_KINDS[self.adapter.attention_call], "patch_attr", None)
        self._patched = [(m, attr) for m in sorted({type(p).__module__ for p in self.originals})] if attr else []
        for name, attr in self._patched:
            patch_core(name, attr)
        for i, m in enumerate(mods):
            m.set_processor(DiTAccelAttnProcessor(self, i, m.processor, self.adapter.attention_call))
        HookRegistry.check_if_exists_or_initialize(self.transformer).register_hook(TransformerHook(self), HOOK_NAME)
        if scheduler is not None:
            _listen(scheduler, self)
            self.scheduler = scheduler
        self.transformer._ditaccel = self

    def uninstall(self):
        for m, p in zip(self.adapter.attention_modules(self.transformer), self.originals):
            m.set_processor(p)
        for name, attr in self._patched:
            unpatch_core(name, attr)
        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(HOOK_NAME, recurse=False)
        if self.scheduler is not None:
            _unlisten(self.scheduler, self)
        del self.transformer._ditaccel
        self.reset()


class TransformerHook(ModelHook):
    """Transformer-level hook: step and CFG tracking before each call, timing after it."""

    _is_stateful = True

    def __init__(self, runtime: Runtime):
        super().__init__()
        self.runtime = runtime
        self.state_manager = runtime.state_manager  # found by diffusers' cache_context

    def pre_forward(self, module, *args, **kwargs):
        self.runtime.begin_call(args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        return self.runtime.end_call(output)

    def reset_state(self, module):
        # diffusers calls this at the end of every call of pipelines whose transformer has
        # CacheMixin (maybe_free_model_hooks): free the tensors, keep the accounting for stats().
        self.runtime.release()
        return module


# ---------------------------------------------------------------------- scheduler listening
def _listen(scheduler, runtime: Runtime):
    """Wrap ``scheduler.set_timesteps`` (instance attribute) so every listening runtime learns the
    schedule and resets at the start of each generation. Signature preserved for diffusers'
    ``inspect.signature(scheduler.set_timesteps)`` checks."""
    listeners = scheduler.__dict__.get("_ditaccel_listeners")
    if listeners is None:
        listeners = scheduler._ditaccel_listeners = []
        original = type(scheduler).set_timesteps.__get__(scheduler)

        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            for rt in list(scheduler._ditaccel_listeners):
                rt.on_set_timesteps(scheduler.timesteps)
            return result

        scheduler.set_timesteps = set_timesteps
    listeners.append(runtime)


def _unlisten(scheduler, runtime: Runtime):
    listeners = scheduler.__dict__.get("_ditaccel_listeners", [])
    if runtime in listeners:
        listeners.remove(runtime)
    if not listeners:
        scheduler.__dict__.pop("set_timesteps", None)
        scheduler.__dict__.pop("_ditaccel_listeners", None)


# ---------------------------------------------------------------------- public entry points
def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile(module)`` wrapper (``OptimizedModule``) compiles: ditaccel hooks
    the original, whose forward the compiled wrapper calls (so apply / remove work before or after
    compiling)."""
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


def split_target(target) -> tuple[object | None, torch.nn.Module]:
    """(pipeline or None, transformer) from a pipeline or a bare transformer (compiled or not)."""
    if isinstance(target, torch.nn.Module):
        return None, _uncompiled(target)
    transformer = getattr(target, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"pipe_or_transformer must be a diffusers pipeline with a .transformer or a transformer "
                        f"module, got {type(target).__name__}")
    return target, _uncompiled(transformer)


def get_runtime(target) -> Runtime | None:
    _, transformer = split_target(target)
    return getattr(transformer, "_ditaccel", None)


def install(target, method, cfg: bool | None = None) -> Runtime:
    pipe, transformer = split_target(target)
    if get_runtime(transformer) is not None:
        raise RuntimeError("ditaccel is already applied to this transformer; call ditaccel.remove first")
    adapter = adapter_for(transformer)
    check_parallelism(transformer, adapter)
    if cfg is not None and adapter.cfg_batch_order is None:
        warnings.warn(f"cfg={cfg} is ignored: {adapter.name} pipelines do not batch CFG", stacklevel=3)
    runtime = Runtime(transformer, adapter, method, cfg)
    runtime.install(scheduler=getattr(pipe, "scheduler", None))
    return runtime


def remove(pipe_or_transformer) -> None:
    """Restore the exact original processors and forward; a no-op if nothing is applied."""
    runtime = get_runtime(pipe_or_transformer)
    if runtime is not None:
        runtime.uninstall()


def stats(pipe_or_transformer) -> Stats:
    """Attention FLOPs ratio, methods used and time of the last generation (under context
    parallelism: FLOPs and counts of all ranks together, time and memory of this rank)."""
    runtime = get_runtime(pipe_or_transformer)
    if runtime is None:
        raise RuntimeError("ditaccel.stats: ditaccel is not applied to this pipeline/transformer")
    return runtime.stats()


def reset(pipe_or_transformer) -> None:
    """Drop all per-generation state (pipelines do this automatically at set_timesteps)."""
    runtime = get_runtime(pipe_or_transformer)
    if runtime is not None:
        runtime.reset()
