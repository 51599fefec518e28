"""ditaccel's attention core under diffusers' context parallelism (Ulysses).

diffusers runs context parallelism by splitting the token sequence across ranks (hooks from the
transformer's ``_cp_plan``) and handing a ``parallel_config`` to ``dispatch_attention_fn``; a
context-parallel backend then calls ``_templated_context_parallel_attention`` with its own
forward op, which under Ulysses exchanges q/k/v all-to-all so that each rank holds *all* tokens
of H/P heads, runs the op, and exchanges the output back.

diffusers keys its backend registry by a closed ``AttentionBackendName`` enum, so a third party
cannot add a backend name. ditaccel is the backend one level up instead: its wrapper of the
processor module's ``dispatch_attention_fn`` (``ditaccel.processors``) sends every call it takes
over to ``context_parallel_core``, which runs diffusers' own templated Ulysses attention with
ditaccel's method core as the forward op. The processors keep their diffusers backend (native
SDPA, context-parallel capable) for every call ditaccel leaves alone (``full`` steps, dense
warm-up, cross-attention), so those run diffusers' own context-parallel path unchanged.

diffusers' Ulysses all-to-all concatenates the ranks' sequence shards in rank order. A family
whose ``_cp_plan`` splits text and image tokens separately (Flux: each rank holds a text shard
and an image shard and joins them into [text_r, image_r]) thus gives the core the order
[text_0, image_0, text_1, image_1, ...]; ``context_parallel_core`` permutes q/k/v (and the key
padding mask) to the true order [all text, all image] before the method core and the output back
after it, so block layouts, text sinks and masks see the positions of one process.

The method core learns which heads it computes from a ``HeadShard``: per-head decisions that
depend on all heads (AdaSpa's head-adaptive sparsity tiers) are made on the gathered global
view, and per-head caches stay with the rank that always holds those heads.

diffusers' ``HunyuanVideoTransformer3DModel`` declares no ``_cp_plan``; ``hunyuan_video_cp_plan``
supplies one (passed as ``enable_parallelism(config=..., cp_plan=...)``) together with the per-rank
slicing of its joint attention mask, which no plan entry can express. ``CogVideoXTransformer3DModel``
declares none either, and its attention processor calls ``F.scaled_dot_product_attention`` itself,
never the dispatcher, so a plan alone would leave each rank attending over its own shard only:
``cogvideox_cp_plan`` supplies the plan together with a hook that runs that call as diffusers'
Ulysses attention (``SDPA_PARALLEL``, read by ``ditaccel.processors``).

Statistics under context parallelism (``ditaccel.stats``) describe the whole computation, as one
process would: the dense attention FLOPs count the full sequence and every head (each rank's call
sees 1/P of the tokens: ``sequence_shards``), method counts are per layer call (the same on every
rank), AdaSpa's kept fraction sums the kept blocks of all ranks' heads (gathered at each search).
Time and cache memory are this rank's.

Refused (``ValueError`` naming the setting): ring attention (``ring_degree > 1``; the templated
ring merges partial outputs by their LSE, which ditaccel's core does not return),
``ulysses_anything`` (uneven head split), tensor parallelism, and families whose adapter does not
declare ``context_parallel``.
"""

from __future__ import annotations

import sys
import weakref

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .models.adapters import COGVIDEOX, HUNYUAN_VIDEO
from .processors import patch_core, processor_module, unpatch_core
from .ulysses import SDPA_PARALLEL, HeadShard, check_parallel_config, context_parallel_core, sequence_shards, true_order  # noqa: F401 - the Ulysses primitives, also reachable here


def check_model(transformer: torch.nn.Module, adapter) -> None:
    """``check_parallel_config`` for the parallelism enabled on ``transformer`` (if any); under
    context parallelism also that a family whose attention needs ditaccel's hook to be context
    parallel at all (CogVideoX: ``cogvideox_cp_plan``) has it on every attention module."""
    config = getattr(transformer, "_parallel_config", None)
    check_parallel_config(config, adapter.name, adapter.context_parallel)
    if config is None or config.context_parallel_config is None:
        return
    need = _ATTENTION_HOOKS.get(adapter.transformer_class)
    if need is not None:
        hook, plan = need
        if any(getattr(m, "_diffusers_hook", None) is None or m._diffusers_hook.get_hook(hook) is None
               for m in adapter.attention_modules(transformer)):
            raise ValueError(f"parallel_config: {adapter.transformer_class} attention is context parallel only "
                             f"through ditaccel's cp_plan: enable_parallelism(config=..., "
                             f"cp_plan=ditaccel.parallel.{plan}(transformer))")


def input_shards(transformer: torch.nn.Module, hook_name: str) -> int:
    """How many shards of the transformer's sequence inputs its hook ``hook_name`` sees.

    diffusers runs a module's hooks last-registered first. When the ``_cp_plan`` splits the inputs
    of the transformer itself (key ``""``, Flux) and that split hook was registered after
    ``hook_name`` (ditaccel applied before parallelism was enabled), ``hook_name`` sees this rank's
    shard of text and image tokens: the Ulysses degree. Otherwise (no context parallelism, the
    split applied inside the transformer as for Wan, or ditaccel applied after it): 1.
    """
    from diffusers.hooks.context_parallel import _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE

    config = getattr(transformer, "_parallel_config", None)
    cp = None if config is None else config.context_parallel_config
    registry = getattr(transformer, "_diffusers_hook", None)
    if cp is None or registry is None:
        return 1
    order = list(registry.hooks)  # registration order
    split = _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE.format("")
    if split in order and hook_name in order and order.index(split) > order.index(hook_name):
        return cp.ulysses_degree
    return 1


_MASK_HOOK = "ditaccel:cp_joint_mask"


def hunyuan_video_cp_plan(transformer: torch.nn.Module) -> dict:
    """A ``cp_plan`` for diffusers' ``HunyuanVideoTransformer3DModel`` (which declares none)::

        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P),
                                       cp_plan=ditaccel.parallel.hunyuan_video_cp_plan(transformer))

    The plan splits the RoPE tables and the video and text tokens entering the first dual-stream
    block into P contiguous shards (rank r holds [video_r, text_r]: its text stays a suffix, as
    ``true_order`` expects) and gathers the video tokens at ``proj_out``; the text refiner runs on
    all text tokens, on every rank. The forward builds one (B, 1, 1, V + T) key-padding mask for
    the whole [video, text] sequence and hands it to every block unchanged; a plan can only cut it
    into contiguous chunks, which are not the masks of the ranks' [video_r, text_r] shards once
    more than T/P text tokens are padding. So this call also registers, once, on every joint
    attention module a hook (``_JointMaskShard``) that cuts this rank's mask; it does nothing
    while context parallelism is not enabled. Ulysses only; ``image_condition_type="token_replace"``
    (its blocks treat the first frame's tokens by position) is refused.
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    if type(transformer).__name__ != HUNYUAN_VIDEO.transformer_class:
        raise ValueError(f"transformer: expected a {HUNYUAN_VIDEO.transformer_class}, got {type(transformer).__name__}")
    if getattr(transformer.config, "image_condition_type", None) == "token_replace":
        raise ValueError("image_condition_type: token_replace blocks treat the first frame's tokens by position, "
                         "which a split sequence does not keep; no cp_plan for them")
    for attn in HUNYUAN_VIDEO.attention_modules(transformer):
        registry = HookRegistry.check_if_exists_or_initialize(attn)
        if registry.get_hook(_MASK_HOOK) is None:
            registry.register_hook(_JointMaskShard(), _MASK_HOOK)
    rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)  # (V, D) cos and sin
    tokens = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
    return {"rope": {0: rope, 1: rope},
            "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


class _JointMaskShard(ModelHook):
    """Gives a HunyuanVideo joint attention module the key-padding mask of this rank's
    [video_r, text_r] tokens, cut from the forward's (B, 1, 1, V + T) mask of the whole sequence.
    diffusers' Ulysses all-gathers such per-rank masks in rank order, the order of the gathered
    tokens (``hunyuan_video_cp_plan``)."""

    def pre_forward(self, module, *args, **kwargs):
        config = getattr(module.processor, "_parallel_config", None)
        cp = None if config is None else config.context_parallel_config
        mask, text = kwargs.get("attention_mask"), kwargs.get("encoder_hidden_states")
        if cp is None or mask is None or text is None:
            return args, kwargs
        if cp.ring_degree > 1 or cp.ulysses_anything:
            name = "ring_degree" if cp.ring_degree > 1 else "ulysses_anything"
            raise ValueError(f"{name}: hunyuan_video_cp_plan shards the joint attention mask for Ulysses only "
                             "(ring_degree=1, ulysses_anything=False)")
        p, r = cp.ulysses_degree, cp._ulysses_local_rank
        video = mask.shape[-1] - text.shape[1] * p  # video tokens of the whole sequence (text: this rank's share)
        kwargs["attention_mask"] = torch.cat([mask[..., :video].chunk(p, dim=-1)[r],
                                              mask[..., video:].chunk(p, dim=-1)[r]], dim=-1)
        return args, kwargs


_SDPA_HOOK = "ditaccel:cp_sdpa_ulysses"


def cogvideox_cp_plan(transformer: torch.nn.Module) -> dict:
    """A ``cp_plan`` for diffusers' ``CogVideoXTransformer3DModel`` (which declares none)::

        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P),
                                       cp_plan=ditaccel.parallel.cogvideox_cp_plan(transformer))

    The blocks keep the text and video tokens apart and each attention call joins them as
    [text, video], with the rotary embeddings (CogVideoX 1.5 and 5b; 2b adds sin-cos positions in
    the patch embedding, before the split) applied to the video part only. The plan splits the
    video and the text tokens entering the first block into P contiguous shards (rank r attends
    over [text_r, video_r]: its text stays a prefix, as ``true_order`` expects) and the rotary
    tables entering every block the same way as the video, and gathers the video tokens at
    ``proj_out``. The text and the video must each split evenly: ``max_text_seq_length`` (226 as
    released: P = 2) and the video tokens divisible by P.

    ``CogVideoXAttnProcessor2_0`` calls ``F.scaled_dot_product_attention`` itself, not diffusers'
    dispatcher, so this call also registers, once, on every attention module a hook
    (``_SdpaUlysses``) that runs that call as diffusers' Ulysses attention (native SDPA on all
    tokens of this rank's heads, or ditaccel's core while ditaccel is applied); it does nothing
    while context parallelism is not enabled. Ulysses only; no attention mask.
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    if type(transformer).__name__ != COGVIDEOX.transformer_class:
        raise ValueError(f"transformer: expected a {COGVIDEOX.transformer_class}, got {type(transformer).__name__}")
    for attn in COGVIDEOX.attention_modules(transformer):
        registry = HookRegistry.check_if_exists_or_initialize(attn)
        if registry.get_hook(_SDPA_HOOK) is None:
            registry.register_hook(_SdpaUlysses(transformer), _SDPA_HOOK)
    rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=False)  # (V, D) cos and sin
    tokens = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
    return {"transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
            # every block gets the forward's whole tables: split them at each (a "" entry would split
            # the transformer's own inputs, which ditaccel's hook reads as the whole sequence)
            "transformer_blocks.*": {"image_rotary_emb": [rope, rope]},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


class _SdpaUlysses(ModelHook):
    """Runs the ``F.scaled_dot_product_attention`` call of a CogVideoX attention module's processor
    as diffusers' Ulysses attention while its transformer has context parallelism enabled: for the
    duration of the module's forward, the processor module's ``F`` is ditaccel's stand-in
    (``ditaccel.processors``, reference-counted) and ``SDPA_PARALLEL`` holds the parallel config."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self._transformer = weakref.ref(transformer)  # the config is set on the transformer, not the processor

    def new_forward(self, module, *args, **kwargs):
        transformer = self._transformer()
        config = None if transformer is None else getattr(transformer, "_parallel_config", None)
        if config is None or config.context_parallel_config is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        cp = config.context_parallel_config
        if cp.ring_degree > 1 or cp.ulysses_anything:
            name = "ring_degree" if cp.ring_degree > 1 else "ulysses_anything"
            raise ValueError(f"{name}: cogvideox_cp_plan runs the attention as Ulysses only "
                             "(ring_degree=1, ulysses_anything=False)")
        name = processor_module(module.processor)
        if not hasattr(sys.modules[name], "F"):
            raise ValueError(f"processor: cogvideox_cp_plan needs a processor calling F.scaled_dot_product_attention "
                             f"(CogVideoXAttnProcessor2_0), got {type(module.processor).__name__}")
        patch_core(name, "F")
        token = SDPA_PARALLEL.set(config)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            SDPA_PARALLEL.reset(token)
            unpatch_core(name, "F")


# families whose attention is context parallel only through a hook of ditaccel's cp_plan:
# transformer class -> (hook name, cp_plan function)
_ATTENTION_HOOKS = {COGVIDEOX.transformer_class: (_SDPA_HOOK, "cogvideox_cp_plan")}
