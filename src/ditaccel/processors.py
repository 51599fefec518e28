"""Attention processors: the per-layer link between a diffusers attention module and a method.

A processor knows its layer index and the runtime that tracks step and CFG branch; it wraps the
module's original processor and exposes the call to the method through ``AttentionCall``
(``ditaccel.methods.ditfastattn``). One ``AttentionCall`` kind per attention-call convention:

- ``"sdpa_self"``: diffusers' ``AttnProcessor2_0`` self-attention (DiT, PixArt): ditaccel can
  compute q/k/v and the output projection itself.
- ``"dispatch"``: processors that call ``dispatch_attention_fn`` (Wan, HunyuanVideo, Flux): the
  original processor runs as is (RoPE, norms, joint text/video concat) and only its attention
  core is replaced, through a guarded wrapper of the processor module's ``dispatch_attention_fn``.
- ``"sdpa_module"``: the same for processors calling ``F.scaled_dot_product_attention`` (CogVideoX),
  through a stand-in for that module's ``F``.

Every kind offers the same two operations to a method: ``full()`` (the unmodified module output)
and ``core(fn, rows=None)`` (the module output with the attention core replaced by
``fn(q, k, v, key_padding_mask)`` in head space (B, H, L, D), the whole attention sequence of joint
attention included; ``rows`` = one CFG half of the batch: the core runs on those rows only and its
result stands for both halves). Every DiTFastAttn method and AdaSpa run through these two.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys

import torch

from .ulysses import SDPA_PARALLEL, context_parallel_core, sequence_shards


def _rows(x, rows):
    return x if rows is None or x is None else x[rows]


def _repeat_halves(x: torch.Tensor) -> torch.Tensor:
    """The result for one half of a CFG batch, standing for both halves."""
    return torch.cat([x, x], dim=0)


#: the DiTFastAttn methods every call kind runs (through ``full`` and ``core``)
ALL_METHODS = frozenset({"full", "wars", "ast", "asc", "wars+asc", "wa"})


class SdpaSelfAttentionCall:
    """One self-attention call in the ``AttnProcessor2_0`` convention, (B, L, C) hidden states."""

    #: DiTFastAttn methods this convention can run
    methods = ALL_METHODS

    @staticmethod
    def handles(encoder_hidden_states) -> bool:
        return encoder_hidden_states is None  # with encoder states it is cross-attention: not ours

    def __init__(self, original, attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs):
        if hidden_states.ndim != 3:
            raise ValueError("ditaccel supports (B, L, C) hidden states in self-attention only")
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("ditaccel: attention modules with spatial/group norm are not supported")
        self.original, self.attn, self.args, self.kwargs = original, attn, args, kwargs
        self.hidden_states, self.attention_mask = hidden_states, attention_mask
        self.batch_size = hidden_states.shape[0]

    def full(self, rows=None):
        return self.original(self.attn, _rows(self.hidden_states, rows), None, _rows(self.attention_mask, rows),
                             *self.args, **self.kwargs)

    def qkv(self, rows=None):
        if self.attention_mask is not None:
            raise ValueError("ditaccel: window attention with an attention_mask on self-attention is not supported")
        attn, x = self.attn, _rows(self.hidden_states, rows)
        b, heads = x.shape[0], attn.heads
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        d = k.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        self._x = x  # rows of the last qkv(): project() adds their residual connection
        return q, k, v

    def core(self, fn, rows=None):
        """The module output with its attention core replaced by ``fn(q, k, v, key_padding_mask)``.
        rows: one CFG half of the batch: projections, core and output projection run on these rows
        only, and the output is repeated for both halves."""
        q, k, v = self.qkv(rows)
        out = self.project(fn(q, k, v, None))
        return out if rows is None else _repeat_halves(out)

    def project(self, heads):
        attn = self.attn
        b, h, length, d = heads.shape
        x = heads.transpose(1, 2).reshape(b, length, h * d)
        x = attn.to_out[1](attn.to_out[0](x))
        if attn.residual_connection:
            x = x + self._x
        return x / attn.rescale_output_factor


# ------------------------------------------------------------------ dispatch interception
# (core fn, text layout of the attention sequence) of the ditaccel core running in this context
_CORE: contextvars.ContextVar = contextvars.ContextVar("ditaccel_core", default=None)
_PATCHED: dict[str, tuple[object, int]] = {}  # module name -> (original dispatch_attention_fn, users)


def _key_padding(attn_mask, batch: int, length: int):
    """A boolean (B, L) key-padding mask from a dispatcher mask, or None; other masks are refused.

    A mask that keeps every key is None: the same attention, and the kernels take their unmasked
    paths (cuDNN without a bias, no per-tile mask loads). diffusers' HunyuanVideo passes its text mask
    on every call, all True when no text token is padding; kept, it made cuDNN's attention with the LSE
    1.41x slower and AdaSpa's cached search 1.24x on the H200 at HunyuanVideo's size (BENCHMARKS.md,
    "Issue 19, third pass"). The check reads one bool back from the device per attention call."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.dtype == torch.bool and m.numel() == batch * length:
        m = m.reshape(batch, length)
    elif m.dtype == torch.bool and m.shape[-1] == length and m.shape[0] == batch:
        m = m.reshape(batch, -1, length)[:, 0]  # (B, 1, 1, L)-style broadcast masks
    else:
        raise ValueError("ditaccel: only boolean key-padding attention masks are supported on the sparse path")
    return None if bool(m.all()) else m


def _make_dispatch(original):
    def dispatch_attention_fn(query, key, value, attn_mask=None, *args, **kwargs):
        if torch.compiler.is_compiling():  # compiled code never runs a ditaccel core (_run is eager)
            return original(query, key, value, attn_mask, *args, **kwargs)
        core = _CORE.get()
        if core is None or key.shape[1] != query.shape[1]:  # not ours, or a cross-attention call
            return original(query, key, value, attn_mask, *args, **kwargs)
        fn, text = core
        if kwargs.get("parallel_config") is not None:  # diffusers context parallelism: query is this rank's shard
            return context_parallel_core(fn, query, key, value, attn_mask, kwargs["parallel_config"], _key_padding,
                                         text)
        b, length = query.shape[:2]
        out = fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                 _key_padding(attn_mask, b, length))
        return out.transpose(1, 2)

    dispatch_attention_fn.__wrapped__ = original
    return dispatch_attention_fn


class _FunctionalProxy:
    """Stands in for ``torch.nn.functional`` inside one diffusers module: everything is the real
    module except ``scaled_dot_product_attention``, which a ditaccel core may take over."""

    def __init__(self, functional):
        self._F = functional

    def __getattr__(self, name):
        return getattr(self._F, name)

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, **kwargs):
        if torch.compiler.is_compiling():  # compiled code never runs a ditaccel core (_run is eager)
            return self._F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                        is_causal=is_causal, scale=scale, **kwargs)
        core = _CORE.get()
        if key.shape[-2] != query.shape[-2] or dropout_p or is_causal or scale is not None or kwargs:
            core = None  # not a call a ditaccel core takes over
        parallel_config = SDPA_PARALLEL.get()
        if parallel_config is not None:  # context parallelism (cogvideox_cp_plan): query holds this rank's tokens
            return _sdpa_ulysses(core, query, key, value, attn_mask, parallel_config, dropout_p=dropout_p,
                                 is_causal=is_causal, scale=scale, **kwargs)
        if core is None:
            return self._F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                        is_causal=is_causal, scale=scale, **kwargs)
        return core[0](query, key, value, _key_padding(attn_mask, query.shape[0], query.shape[-2]))


def _sdpa_ulysses(core, query, key, value, attn_mask, parallel_config, **sdpa_kwargs):
    """``F.scaled_dot_product_attention`` on (B, H, L/P, D) shards as diffusers' Ulysses attention:
    the ditaccel core (``_CORE``'s (fn, text)) when it takes the call, else diffusers' native SDPA."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    if attn_mask is not None:
        raise ValueError("attention_mask: F.scaled_dot_product_attention under context parallelism "
                         "(cogvideox_cp_plan) runs without an attention mask only")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # the dispatcher's (B, L, H, D)
    if core is None:
        out = dispatch_attention_fn(q, k, v, **sdpa_kwargs, backend=AttentionBackendName.NATIVE,
                                    parallel_config=parallel_config)
    else:
        out = context_parallel_core(core[0], q, k, v, None, parallel_config, _key_padding, core[1])
    return out.transpose(1, 2)


_WRAPPERS = {"dispatch_attention_fn": _make_dispatch, "F": _FunctionalProxy}


def patch_core(module_name: str, attr: str) -> None:
    """Route ``module_name.<attr>`` (``dispatch_attention_fn`` or ``F``) through ditaccel
    (ref-counted; a no-op for calls made outside a ditaccel core)."""
    key = f"{module_name}.{attr}"
    if key in _PATCHED:
        orig, users = _PATCHED[key]
        _PATCHED[key] = (orig, users + 1)
        return
    mod = sys.modules[module_name]
    orig = getattr(mod, attr)
    _PATCHED[key] = (orig, 1)
    setattr(mod, attr, _WRAPPERS[attr](orig))


def processor_module(processor) -> str:
    """Name of the module whose ``dispatch_attention_fn``/``F`` a processor calls (under ditaccel's
    processor: the original's)."""
    if isinstance(processor, DiTAccelAttnProcessor):
        processor = processor.original
    return type(processor).__module__


def unpatch_core(module_name: str, attr: str) -> None:
    key = f"{module_name}.{attr}"
    orig, users = _PATCHED[key]
    if users > 1:
        _PATCHED[key] = (orig, users - 1)
    else:
        setattr(sys.modules[module_name], attr, orig)
        del _PATCHED[key]


class DispatchAttentionCall:
    """One self- or joint-attention call of a ``dispatch_attention_fn`` processor (Wan,
    HunyuanVideo, ...). The adapter picked the module; text states of joint attention pass through."""

    patch_attr = "dispatch_attention_fn"  # what of the processor's module routes the core to ditaccel

    #: DiTFastAttn methods this convention can run: all, at the attention core
    methods = ALL_METHODS

    #: (text tokens, "prefix"/"suffix"/None) of the attention sequence, from the step context (set
    #: by the processor): under context parallelism the core puts the gathered tokens in true order
    text: tuple[int, str | None] = (0, None)

    @staticmethod
    def handles(encoder_hidden_states) -> bool:
        return True

    def __init__(self, original, attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs):
        self.original, self.attn, self.args, self.kwargs = original, attn, args, kwargs
        self.hidden_states, self.encoder_hidden_states = hidden_states, encoder_hidden_states
        self.attention_mask = attention_mask
        self.batch_size = hidden_states.shape[0]

    def full(self):
        return self.original(self.attn, self.hidden_states, self.encoder_hidden_states, self.attention_mask,
                             *self.args, **self.kwargs)

    def core(self, fn, rows=None):
        """The module output with the attention core of its self-attention dispatch replaced by
        ``fn(q, k, v, key_padding_mask)``; under diffusers context parallelism by
        ``fn(q, k, v, key_padding_mask, heads=HeadShard)`` on all tokens of this rank's heads.
        rows: one CFG half of the batch: ``fn`` sees those rows only and its output stands for
        both halves (the projections around the core still run on every row)."""
        if rows is not None:
            fn = _on_rows(fn, rows)
        token = _CORE.set((fn, self.text))
        try:
            return self.full()
        finally:
            _CORE.reset(token)


def _on_rows(fn, rows):
    def core(q, k, v, key_padding_mask=None, **kwargs):
        kpm = None if key_padding_mask is None else key_padding_mask[rows]
        return _repeat_halves(fn(q[rows], k[rows], v[rows], kpm, **kwargs))

    return core


class SdpaModuleAttentionCall(DispatchAttentionCall):
    """Processors that call ``F.scaled_dot_product_attention`` on joint sequences they build
    themselves (CogVideoX): the same as the dispatch kind, routed through the module's ``F``."""

    patch_attr = "F"


CALL_KINDS = {"sdpa_self": SdpaSelfAttentionCall, "dispatch": DispatchAttentionCall,
              "sdpa_module": SdpaModuleAttentionCall}


class DiTAccelAttnProcessor:
    """Replaces one self-attention module's processor while ditaccel is applied.

    ``DiTAccelAttnProcessor(runtime, layer, original, call_kind)`` makes an instance of a subclass
    per original processor class (:func:`_processor_class`) whose class-level ``__call__`` shows
    the original's signature: diffusers' ``Attention.forward`` drops keyword arguments the
    processor's signature does not name (e.g. HunyuanVideo's ``image_rotary_emb``), and under
    ``torch.compile`` a class-level ``__call__`` is one object for every layer (a per-instance one
    made Dynamo recompile ``Attention.forward`` once per layer).

    ``runtime`` is the ``ditaccel.runtime.Runtime`` that installed it (duck-typed here: the runtime
    sits above the processors and imports them, never the other way round).
    """

    def __new__(cls, runtime, layer: int, original, call_kind: str):
        return super().__new__(_processor_class(type(original)) if cls is DiTAccelAttnProcessor else cls)

    def __init__(self, runtime, layer: int, original, call_kind: str):
        self.runtime, self.layer, self.original = runtime, layer, original
        self.call_cls = CALL_KINDS[call_kind]

    # diffusers' enable_parallelism / set_attention_backend set these on every processor: they
    # belong to the original processor, which runs every call ditaccel leaves alone.
    @property
    def _parallel_config(self):
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.original._parallel_config = value

    @property
    def _attention_backend(self):
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.original._attention_backend = value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    # Opaque to torch.compile: the method's per-step choice, its caches and the stats run eagerly
    # (traced, they would make Dynamo guard on the step and recompile at every step); the kernels
    # launch as in eager mode. Dynamo breaks the graph here and compiles the rest of the model.
    @torch.compiler.disable
    def _run(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if not self.call_cls.handles(encoder_hidden_states):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        call = self.call_cls(self.original, attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs)
        if hasattr(call, "text"):
            ctx = self.runtime.state.ctx
            call.text = (ctx.text_tokens, ctx.text_position)
        # the whole attention sequence: joint calls add the text tokens; under context parallelism
        # this rank holds 1/P of them
        tokens = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        tokens *= sequence_shards(self.runtime.transformer)
        inner = attn.heads * (attn.to_q.out_features // attn.heads)
        return self.runtime.attention(self.layer, call, dense_flops(call.batch_size, tokens, inner))


@functools.cache
def _processor_class(original_cls: type) -> type:
    """The ``DiTAccelAttnProcessor`` subclass for processors of ``original_cls``: its ``__call__``
    carries the original ``__call__``'s signature."""

    def __call__(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    __call__.__signature__ = inspect.signature(original_cls.__call__)
    return type(f"DiTAccel{original_cls.__name__}", (DiTAccelAttnProcessor,),
                {"__call__": __call__, "__module__": __name__, "__qualname__": f"DiTAccel{original_cls.__name__}"})


def dense_flops(batch: int, tokens: int, inner_dim: int) -> float:
    """FLOPs of dense attention (QKᵀ and PV, 2 FLOPs per multiply-add) for a call."""
    return 4.0 * batch * tokens * tokens * inner_dim
