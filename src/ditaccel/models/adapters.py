"""Model adapters: what ditaccel must know about a diffusers transformer family, as data.

One record per family. Nothing else in the library looks at model classes: the runtime asks
the record which attention modules to wrap, how the token sequence of those modules is laid
out, where the timestep is and how classifier-free guidance (CFG) is batched.
Adding a family is adding a record (and, for a new attention-call convention, one
``AttentionCall`` kind in ``ditaccel.processors``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelAdapter:
    """How one diffusers transformer family is laid out.

    Attributes:
        name: short family name, written into plan files.
        transformer_class: class name of the diffusers transformer (``type(model).__name__``).
        blocks: attribute paths of the block lists, in execution order. Layers are numbered
            across them in that order (e.g. Flux: ``("transformer_blocks", "single_transformer_blocks")``).
        attention: attribute of a block holding the *self*-attention module to compress.
            Cross-attention modules are never touched.
        attention_call: how the attention module is called (the convention of its processor):
            ``"sdpa_self"`` for diffusers' ``AttnProcessor2_0`` self-attention.
        timestep_arg: name of the forward argument carrying the diffusion timestep.
        timestep_scale: the pipeline passes ``scheduler_timestep * timestep_scale`` (Flux: 1/1000).
        cfg_batch_order: order of the two CFG halves when the pipeline batches them in one call
            (``("cond", "uncond")`` for DiT, ``("uncond", "cond")`` for PixArt); ``None`` when the
            family's pipelines never batch CFG.
        cfg_cond_arg: forward argument carrying the conditioning that tells the CFG halves apart
            (DiT: ``"class_labels"``; PixArt, CogVideoX: ``"encoder_hidden_states"``). With it, a
            batch counts as CFG-batched only when its latent halves are identical and its
            conditioning halves are not (a batch of two samples with the same noise and different
            labels or prompts is not CFG when the rule below can tell). ``None``: latents only.
        cfg_null_label_attr: config attribute holding the null class label the unconditional half
            carries in ``cfg_cond_arg`` (DiT: ``"num_embeds_ada_norm"``); when set, CFG also needs
            every unconditional label to be it and no conditional label to be it.
        patch_size_attr: config attribute giving the spatial patch size of the token grid (Wan:
            a (t, h, w) tuple).
        patch_size_t_attr: config attribute giving the temporal patch size, where separate
            (``None`` or absent in the config: 1).
        video_layout: dimension order of a 5-D latent input: ``"BCFHW"`` (Wan, HunyuanVideo) or
            ``"BFCHW"`` (CogVideoX).
        text_tokens: where text tokens sit in the self-attention sequence: ``None`` (image
            tokens only), ``"prefix"`` or ``"suffix"``.
        context_parallel: ditaccel runs this family under diffusers' Ulysses context parallelism
            (``ditaccel.parallel``): its dispatch processor passes ``parallel_config`` to the core,
            and after the all-to-all the attention sequence is in true token order, or each rank's
            shard holds its share of the text at ``text_tokens`` (the core reorders it).
    """

    name: str
    transformer_class: str
    blocks: tuple[str, ...]
    attention: str
    attention_call: str
    timestep_arg: str = "timestep"
    timestep_scale: float = 1.0
    cfg_batch_order: tuple[str, str] | None = ("cond", "uncond")
    cfg_cond_arg: str | None = None
    cfg_null_label_attr: str | None = None
    patch_size_attr: str = "patch_size"
    patch_size_t_attr: str | None = None
    video_layout: str = "BCFHW"
    text_tokens: str | None = None
    context_parallel: bool = False

    # ---- derived facts, all from the record + module structure, never from isinstance chains
    def attention_modules(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """Self-attention modules in layer order."""
        mods = []
        for path in self.blocks:
            for block in _getattr_path(transformer, path):
                mods.append(getattr(block, self.attention))
        return mods

    def token_frames(self, transformer: torch.nn.Module, hidden_states: torch.Tensor) -> int:
        """Frames of the token grid (``token_grid`` stacks their rows): ⌈F/pt⌉ for a video latent,
        1 otherwise."""
        if hidden_states.ndim != 5:
            return 1
        p = getattr(transformer.config, self.patch_size_attr)
        if isinstance(p, (tuple, list)):
            pt = p[0]
        else:
            pt = (getattr(transformer.config, self.patch_size_t_attr, None) if self.patch_size_t_attr else None) or 1
        return -(-hidden_states.shape[1 if self.video_layout == "BFCHW" else 2] // pt)

    def token_grid(self, transformer: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of the visual token grid for a latent input of shape (B, C, H, W); for
        video (``video_layout``) the frames stack their rows: (⌈F/pt⌉ · H/ph, W/pw), which is the
        same row-major order (a last partial temporal patch is padded by the model)."""
        if hidden_states.ndim == 3:  # packed tokens (Flux): no spatial grid in the input
            return (1, hidden_states.shape[1])
        p = getattr(transformer.config, self.patch_size_attr)
        if hidden_states.ndim == 5:
            if isinstance(p, (tuple, list)):
                pt, ph, pw = p
            else:
                pt = getattr(transformer.config, self.patch_size_t_attr, None) if self.patch_size_t_attr else None
                pt, ph, pw = pt or 1, p, p
            f = hidden_states.shape[1 if self.video_layout == "BFCHW" else 2]
            h, w = hidden_states.shape[-2:]
            return (-(-f // pt) * (h // ph), w // pw)
        p = p[-1] if isinstance(p, (tuple, list)) else p
        h, w = hidden_states.shape[-2:]
        return (h // p, w // p)

    def text_layout(self, bound_args: dict) -> tuple[int, str | None]:
        """(number of text tokens in the self-attention sequence, their position)."""
        if self.text_tokens is None:
            return 0, None
        ctx = bound_args.get("encoder_hidden_states")
        return (0 if ctx is None else ctx.shape[1]), self.text_tokens

    def cond_index(self) -> int:
        """Position (0 or 1) of the conditional half in a CFG-batched call."""
        if self.cfg_batch_order is None:
            raise ValueError(f"{self.name} pipelines do not batch classifier-free guidance")
        return self.cfg_batch_order.index("cond")


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


DIT = ModelAdapter(
    name="dit",
    transformer_class="DiTTransformer2DModel",
    blocks=("transformer_blocks",),
    attention="attn1",
    attention_call="sdpa_self",
    cfg_batch_order=("cond", "uncond"),
    cfg_cond_arg="class_labels",
    cfg_null_label_attr="num_embeds_ada_norm",  # DiTPipeline's class_null
)

PIXART = ModelAdapter(
    name="pixart",
    transformer_class="PixArtTransformer2DModel",
    blocks=("transformer_blocks",),
    attention="attn1",  # attn2 is cross-attention to T5: untouched
    attention_call="sdpa_self",
    cfg_batch_order=("uncond", "cond"),
    cfg_cond_arg="encoder_hidden_states",
)

WAN = ModelAdapter(
    name="wan",
    transformer_class="WanTransformer3DModel",
    blocks=("blocks",),
    attention="attn1",  # attn2 is cross-attention to the text: untouched
    attention_call="dispatch",
    cfg_batch_order=None,  # the pipeline runs cond and uncond as separate calls (cache_context)
    context_parallel=True,  # _cp_plan splits the video tokens contiguously: true order after the all-to-all
)

HUNYUAN_VIDEO = ModelAdapter(
    name="hunyuan-video",
    transformer_class="HunyuanVideoTransformer3DModel",
    blocks=("transformer_blocks", "single_transformer_blocks"),  # dual-stream, then single-stream
    attention="attn",  # joint [video, text] attention; the text key-padding mask reaches the core
    attention_call="dispatch",
    cfg_batch_order=None,  # guidance-distilled
    patch_size_t_attr="patch_size_t",
    text_tokens="suffix",
    context_parallel=True,  # with ditaccel.parallel.hunyuan_video_cp_plan: each rank holds [video_r, text_r]
)

COGVIDEOX = ModelAdapter(
    name="cogvideox",
    transformer_class="CogVideoXTransformer3DModel",
    blocks=("transformer_blocks",),
    attention="attn1",  # joint [text, video] attention built inside the processor
    attention_call="sdpa_module",
    cfg_batch_order=("uncond", "cond"),
    cfg_cond_arg="encoder_hidden_states",
    patch_size_t_attr="patch_size_t",  # None for 2b/5b, 2 for CogVideoX 1.5
    video_layout="BFCHW",
    text_tokens="prefix",
    context_parallel=True,  # with ditaccel.parallel.cogvideox_cp_plan: each rank holds [text_r, video_r]
)

FLUX = ModelAdapter(
    name="flux",
    transformer_class="FluxTransformer2DModel",
    blocks=("transformer_blocks", "single_transformer_blocks"),
    attention="attn",  # joint [text, image] attention
    attention_call="dispatch",
    timestep_scale=1e-3,  # the pipeline passes t / 1000
    cfg_batch_order=None,  # guidance-distilled; true CFG runs separate calls
    text_tokens="prefix",
    context_parallel=True,  # _cp_plan splits text and image per rank: the core restores the true order
)

ADAPTERS: dict[str, ModelAdapter] = {
    a.transformer_class: a for a in (DIT, PIXART, WAN, HUNYUAN_VIDEO, COGVIDEOX, FLUX)
}


def register_adapter(adapter: ModelAdapter) -> None:
    """Register a record for another transformer class (overrides an existing one)."""
    ADAPTERS[adapter.transformer_class] = adapter


def adapter_for(transformer: torch.nn.Module) -> ModelAdapter:
    name = type(transformer).__name__
    if name not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise TypeError(
            f"ditaccel has no adapter for transformer class {name!r}; supported: {supported}. "
            "Register one with ditaccel.models.register_adapter(ModelAdapter(...))."
        )
    return ADAPTERS[name]
