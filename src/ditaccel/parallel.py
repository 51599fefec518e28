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

Refused (``ValueError`` naming the setting): ring attention (``ring_degree > 1``; the templated
ring merges partial outputs by their LSE, which ditaccel's core does not return),
``ulysses_anything`` (uneven head split), tensor parallelism, and families whose adapter does not
declare ``context_parallel``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class HeadShard:
    """The heads one rank computes in a Ulysses attention call.

    Attributes:
        start: first global head index of this rank's heads.
        count: heads on this rank (H / ulysses_degree).
        total: heads of the attention module (H).
        group: the Ulysses process group (for ``gather``).
    """

    start: int
    count: int
    total: int
    group: object

    @property
    def ranks(self) -> int:
        return self.total // self.count

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, count, ...) on every rank → (B, total, ...) in global head order, on every rank."""
        parts = [torch.empty_like(x) for _ in range(self.ranks)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)


def check_parallel_config(parallel_config, family: str, supported: bool) -> None:
    """Refuse a diffusers ``ParallelConfig`` ditaccel cannot run correctly (``ValueError`` naming
    the setting); ``None`` passes."""
    if parallel_config is None:
        return
    if getattr(parallel_config, "tensor_parallel_config", None) is not None:
        raise ValueError("tensor_parallel_config: ditaccel does not support tensor parallelism (each rank would "
                         "decide over its local heads only); use context parallelism (ulysses_degree)")
    cp = parallel_config.context_parallel_config
    if cp is None:
        return
    if not supported:
        raise ValueError(f"parallel_config: ditaccel does not support context parallelism for {family} "
                         "transformers (supported: families whose adapter sets context_parallel=True)")
    if cp.ring_degree > 1:
        raise ValueError(f"ring_degree: ditaccel supports Ulysses context parallelism only (ring_degree=1), got "
                         f"ring_degree={cp.ring_degree}: ring attention merges partial outputs by their LSE, which "
                         "ditaccel's attention core does not return yet")
    if cp.ulysses_anything:
        raise ValueError("ulysses_anything: ditaccel needs the heads split evenly across ranks; "
                         "use ulysses_anything=False")


def check_model(transformer: torch.nn.Module, adapter) -> None:
    """``check_parallel_config`` for the parallelism enabled on ``transformer`` (if any)."""
    check_parallel_config(getattr(transformer, "_parallel_config", None), adapter.name, adapter.context_parallel)


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


def true_order(length: int, ranks: int, text_tokens: int, text_position: str | None) -> torch.Tensor | None:
    """Indices that put a gathered Ulysses sequence in true token order, or ``None`` when it is.

    The gathered sequence (``length`` tokens) is the ranks' shards in rank order; each shard holds
    ``text_tokens / ranks`` text tokens before (``"prefix"``) or after (``"suffix"``) its image
    tokens. ``gathered[:, order]`` is [all text, all image] (prefix) or [all image, all text].
    """
    if not text_tokens or ranks == 1:
        return None
    if text_tokens % ranks or length % ranks or text_tokens > length:
        raise ValueError(f"text_tokens: {text_tokens} text tokens of a {length}-token sequence cannot be split "
                         f"evenly across {ranks} ranks")
    local, text = length // ranks, text_tokens // ranks
    idx = torch.arange(length).view(ranks, local)
    if text_position == "prefix":
        return torch.cat([idx[:, :text].flatten(), idx[:, text:].flatten()])
    if text_position == "suffix":
        return torch.cat([idx[:, :local - text].flatten(), idx[:, local - text:].flatten()])
    raise ValueError(f"text_position must be 'prefix' or 'suffix', got {text_position!r}")


def context_parallel_core(fn, query, key, value, attn_mask, parallel_config, key_padding, text=(0, None)):
    """Run the ditaccel core ``fn`` as diffusers' Ulysses attention.

    query/key/value: this rank's tokens of all heads, (B, L/P, H, D) (the dispatcher's layout).
    ``fn(q, k, v, key_padding_mask, heads=HeadShard)`` gets all L tokens of this rank's heads in
    (B, H/P, L, D), in true token order; ``key_padding(attn_mask, batch, length)`` turns the
    (gathered) dispatcher mask into a key-padding mask. text: (text tokens of the whole sequence,
    ``"prefix"``/``"suffix"``/``None``), as in the step context: each rank's shard holds its share
    of them (see ``true_order``). Returns this rank's tokens of the output, (B, L/P, H, D).
    """
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    check_parallel_config(parallel_config, "this", True)
    cp = parallel_config.context_parallel_config
    per_rank = query.shape[2] // cp.ulysses_degree
    shard = HeadShard(cp._ulysses_local_rank * per_rank, per_rank, query.shape[2], cp._ulysses_mesh.get_group())
    order = true_order(query.shape[1] * cp.ulysses_degree, cp.ulysses_degree, *text)

    def forward_op(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   return_lse=False, _save_ctx=True, _parallel_config=None):
        kpm = key_padding(attn_mask, q.shape[0], k.shape[1])
        if order is not None:
            idx = order.to(q.device)
            q, k, v = q[:, idx], k[:, idx], v[:, idx]
            kpm = None if kpm is None else kpm[:, idx]
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kpm, heads=shard).transpose(1, 2)
        if order is not None:
            out = torch.empty_like(out).index_copy_(1, idx, out)  # back to the gathered order
        return out

    return _templated_context_parallel_attention(query, key, value, attn_mask, forward_op=forward_op,
                                                 backward_op=_inference_only, _parallel_config=parallel_config)


def _inference_only(ctx, grad_out, *args, **kwargs):
    raise RuntimeError("ditaccel's attention methods are inference-only: no backward pass under context parallelism")
