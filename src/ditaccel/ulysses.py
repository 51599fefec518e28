"""The Ulysses primitives under ditaccel's attention core: the heads a rank computes
(``HeadShard``), the true token order of a gathered sequence, and ``context_parallel_core``, which
runs a method core as diffusers' templated Ulysses attention.

The processors (``ditaccel.processors``) call into this module; the context-parallel plans and
hooks that set it up live above both, in ``ditaccel.parallel`` (whose docstring tells the story).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: the ``ParallelConfig`` of the context-parallel attention module running now: set by
#: ``cogvideox_cp_plan``'s hook around the module, read by ``ditaccel.processors``' stand-in for
#: the processor module's ``F`` (which then runs ``scaled_dot_product_attention`` as Ulysses)
SDPA_PARALLEL: contextvars.ContextVar = contextvars.ContextVar("ditaccel_sdpa_parallel", default=None)



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


def sequence_shards(transformer: torch.nn.Module) -> int:
    """Shards of every attention sequence of ``transformer``: the Ulysses degree under context
    parallelism (the cp plans of all supported families split every token of their self- and joint
    attention, text included, evenly across the ranks), else 1."""
    config = getattr(transformer, "_parallel_config", None)
    cp = None if config is None else config.context_parallel_config
    return 1 if cp is None else cp.ulysses_degree


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
