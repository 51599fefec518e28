"""Attention processors: the per-layer link between a diffusers ``Attention`` module and a method.

A processor knows its layer index and the runtime that tracks step and CFG branch; it wraps the
module's original processor and exposes the call to the method through ``AttentionCall``
(``ditaccel.methods.ditfastattn``). An ``AttentionCall`` kind per attention-call convention:
``"sdpa_self"`` is diffusers' ``AttnProcessor2_0`` used for self-attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from .runtime import Runtime


def _rows(x, rows):
    return x if rows is None or x is None else x[rows]


class SdpaSelfAttentionCall:
    """One self-attention call in the ``AttnProcessor2_0`` convention, (B, L, C) hidden states."""

    def __init__(self, original, attn, hidden_states, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 3:
            raise ValueError("ditaccel supports (B, L, C) hidden states in self-attention only")
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("ditaccel: attention modules with spatial/group norm are not supported")
        self.original, self.attn, self.kwargs = original, attn, kwargs
        self.hidden_states, self.attention_mask, self.temb = hidden_states, attention_mask, temb
        self.batch_size = hidden_states.shape[0]

    def full(self, rows=None):
        return self.original(self.attn, _rows(self.hidden_states, rows), None,
                             _rows(self.attention_mask, rows), _rows(self.temb, rows), **self.kwargs)

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

    def project(self, heads):
        attn = self.attn
        b, h, length, d = heads.shape
        x = heads.transpose(1, 2).reshape(b, length, h * d)
        x = attn.to_out[1](attn.to_out[0](x))
        if attn.residual_connection:
            x = x + self._x
        return x / attn.rescale_output_factor


CALL_KINDS = {"sdpa_self": SdpaSelfAttentionCall}


class DiTAccelAttnProcessor:
    """Replaces one self-attention module's processor while ditaccel is applied."""

    def __init__(self, runtime: Runtime, layer: int, original, call_kind: str):
        self.runtime, self.layer, self.original = runtime, layer, original
        self.call_cls = CALL_KINDS[call_kind]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or args:
            # not a self-attention call: leave it alone
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        call = self.call_cls(self.original, attn, hidden_states, attention_mask, temb, **kwargs)
        return self.runtime.attention(self.layer, call, dense_flops(call.batch_size, hidden_states.shape[1],
                                                                     attn.inner_dim))


def dense_flops(batch: int, tokens: int, inner_dim: int) -> float:
    """FLOPs of dense attention (QKᵀ and PV, 2 FLOPs per multiply-add) for a call."""
    return 4.0 * batch * tokens * tokens * inner_dim

