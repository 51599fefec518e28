"""An offline, randomly initialised ``FluxPipeline`` (FLUX.1 layout) for tests.

The real pipeline class with tiny components built from config dicts: ``FluxTransformer2DModel``
(double- then single-stream blocks, joint [text, image] attention), a one-level KL VAE with one
latent channel (packed 2x2 by the pipeline: 4 transformer input channels), a tiny CLIP text model
for the pooled projection and a tiny T5 encoder for the token states, with offline word-level
tokenizers. Weights are random but seeded. A call with ``height=width=16`` works on an 8x8 latent,
i.e. 4x4 = 16 packed image tokens, plus ``max_sequence_length`` text tokens.

``guidance_scale`` is the distilled guidance (one transformer call per step); ``true_cfg_scale > 1``
with a ``negative_prompt`` runs CFG as two transformer calls per step, under
``cache_context("cond")`` / ``cache_context("uncond")``.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from .tiny import T5_CONFIG, _finish, _seeded, build_tokenizer
from .video import CLIP_CONFIG, build_clip_tokenizer

__all__ = ["tiny_flux_pipeline"]

FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=4,  # 1 latent channel packed 2x2
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,  # = the T5 d_model
    pooled_projection_dim=8,  # = the CLIP hidden size
    guidance_embeds=True,  # FLUX.1-dev: distilled guidance
    axes_dims_rope=(4, 6, 6),
)

FLUX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(4, 4),  # vae_scale_factor 2
    layers_per_block=1,
    latent_channels=1,
    norm_num_groups=1,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
    shift_factor=0.1159,  # black-forest-labs/FLUX.1-dev
    scaling_factor=0.3611,
)

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def tiny_flux_pipeline(*, num_layers: int = 1, num_single_layers: int = 1, seed: int = 0,
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> FluxPipeline:
    """Text-to-image ``FluxPipeline`` with random weights: 2 heads x 16, ``num_layers`` double- and
    ``num_single_layers`` single-stream blocks, T5 d_model 16, CLIP hidden 8."""
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        **dict(FLUX_TRANSFORMER_CONFIG, num_layers=num_layers, num_single_layers=num_single_layers)))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**FLUX_VAE_CONFIG))
    tokenizer = build_clip_tokenizer()
    clip = dict(CLIP_CONFIG, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**clip)))
    t5 = dict(T5_CONFIG, d_model=16, d_kv=4, d_ff=32)
    text_encoder_2 = _seeded(seed + 3, lambda: T5EncoderModel(T5Config(**t5)))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tokenizer(512),
        transformer=transformer,
    )
    return _finish(pipe, dtype, device)
