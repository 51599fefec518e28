"""Offline test beds: small, randomly initialised, real diffusers pipelines."""

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
    "DIT_LABELS",
    "build_tokenizer",
    "demo_dit_pipeline",
    "demo_pixart_sigma_pipeline",
    "random_prompt_embeds",
    "tiny_dit_pipeline",
    "tiny_pixart_sigma_pipeline",
]
