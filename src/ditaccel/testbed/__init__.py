"""Offline test beds: small, randomly initialised, real diffusers pipelines (``tiny``, ``video``,
exported here; ``flux``'s ``tiny_flux_pipeline`` is imported from its module, since importing
``FluxPipeline`` makes transformers warn about torchvision on every ``ditaccel`` command), and the trained pixel-space testbed: its data (``data``), pipelines (``pixel``),
classifiers (``classifier``) and training (``train``, over ``recipes``, ``training``,
``checkpoint`` and one module per model)."""

from .video import (
    build_clip_tokenizer,
    build_llama_tokenizer,
    tiny_cogvideox_pipeline,
    tiny_hunyuan_video_pipeline,
    tiny_wan_pipeline,
)
from .tiny import (
    DIT_LABELS,
    build_tokenizer,
    demo_dit_pipeline,
    demo_pixart_sigma_pipeline,
    random_prompt_embeds,
    tiny_dit_pipeline,
    tiny_pixart_sigma_pipeline,
)

__all__ = [
    "build_clip_tokenizer",
    "build_llama_tokenizer",
    "tiny_cogvideox_pipeline",
    "tiny_hunyuan_video_pipeline",
    "tiny_wan_pipeline",
    "DIT_LABELS",
    "build_tokenizer",
    "demo_dit_pipeline",
    "demo_pixart_sigma_pipeline",
    "random_prompt_embeds",
    "tiny_dit_pipeline",
    "tiny_pixart_sigma_pipeline",
]
