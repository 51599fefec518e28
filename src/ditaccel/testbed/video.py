"""Offline, randomly initialised *video* diffusers pipelines (Wan2.1, CogVideoX, HunyuanVideo).

The real pipeline classes (``WanPipeline``, ``CogVideoXPipeline``, ``HunyuanVideoPipeline``) with
tiny components built from config dicts: the family's transformer, the family's own 3D VAE class,
the family's text encoder class(es) from tiny ``transformers`` configs, offline word-level
tokenizers (``tokenizers`` library, no download) and the family's released scheduler config.
Weights are random but seeded: the same seed gives bit-identical weights.

All VAEs compress 8x spatially and 4x temporally, as the released ones, with 4 latent channels
(the released ones have 16). A call with ``num_frames=17, height=64, width=64`` therefore works on
5 latent frames of 8x8, i.e. 5 x 4 x 4 = 80 video tokens after the 2x2 patchify.

Quirks:
  * Wan: ``prompt_clean`` uses ``ftfy`` only when it is installed (it is optional).
  * CogVideoX (2b layout: sinusoidal positional embeddings) concatenates ``max_text_seq_length``
    text tokens in front of the video; the pipeline's ``max_sequence_length`` must equal the
    transformer's ``max_text_seq_length`` (default 226, as released).
  * HunyuanVideo: the Llama tokenizer splits with the Llama-3 regex and knows the Llama-3 header
    special tokens, so the pipeline's default prompt template tokenizes to exactly the released
    ``crop_start`` (95) template tokens, and the template is cropped off as in the real model.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from .tiny import T5_CONFIG, TOKENIZER_WORDS, _finish, _seeded, build_tokenizer

__all__ = [
    "build_clip_tokenizer",
    "build_llama_tokenizer",
    "tiny_cogvideox_pipeline",
    "tiny_hunyuan_video_pipeline",
    "tiny_wan_pipeline",
]

LATENT_CHANNELS = 4

# --------------------------------------------------------------------------------------------
# Wan2.1
# --------------------------------------------------------------------------------------------

WAN_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)

# Wan2.1 VAE structure (base_dim 96, dim_mult [1,2,4,4], temporal downsample in the last two
# levels -> 8x spatial / 4x temporal), tiny.
WAN_VAE_CONFIG = dict(
    base_dim=8,
    z_dim=LATENT_CHANNELS,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[0.0] * LATENT_CHANNELS,
    latents_std=[1.0] * LATENT_CHANNELS,
)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (UniPC, flow sigmas, shift 3).
WAN_UNIPC_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    solver_order=2,
    prediction_type="flow_prediction",
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
    disable_corrector=[],
    solver_p=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_flow_sigmas=True,
    flow_shift=3.0,
    timestep_spacing="linspace",
    steps_offset=0,
    final_sigmas_type="zero",
    rescale_betas_zero_snr=False,
)

# UMT5 (umt5-xxl structure: gated-gelu, per-layer relative bias), tiny; d_model = text_dim.
UMT5_CONFIG = dict(T5_CONFIG, d_model=32, d_kv=8, d_ff=64)
WAN_MAX_SEQUENCE_LENGTH = 512  # WanPipeline default


def _wan_scheduler(kind: str):
    if kind == "unipc":
        return UniPCMultistepScheduler(**WAN_UNIPC_CONFIG)
    if kind in ("euler", "flow_euler"):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    raise ValueError(f"scheduler must be 'unipc' or 'euler', got {kind!r}")


def tiny_wan_pipeline(
    *,
    num_layers: int = 2,
    seed: int = 0,
    scheduler: str = "unipc",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> WanPipeline:
    """Text-to-video ``WanPipeline`` (Wan2.1 layout) with random weights.

    2 heads x 16 (hidden 32), patch (1, 2, 2), UMT5 encoder d_model 32 (max 512 tokens, as the
    pipeline's default). ``scheduler``: ``"unipc"`` (the released config, flow shift 3) or
    ``"euler"`` (FlowMatchEulerDiscreteScheduler, shift 3). With ``guidance_scale > 1`` the pipeline
    runs cond and uncond as separate transformer calls under ``cache_context("cond"/"uncond")``.
    """
    transformer = _seeded(seed, lambda: WanTransformer3DModel(**dict(WAN_TRANSFORMER_CONFIG, num_layers=num_layers)))
    vae = _seeded(seed + 1, lambda: AutoencoderKLWan(**WAN_VAE_CONFIG))
    text_encoder = _seeded(seed + 2, lambda: UMT5EncoderModel(UMT5Config(**UMT5_CONFIG)))
    pipe = WanPipeline(
        tokenizer=build_tokenizer(WAN_MAX_SEQUENCE_LENGTH),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_wan_scheduler(scheduler),
        transformer=transformer,
    )
    return _finish(pipe, dtype, device)


# --------------------------------------------------------------------------------------------
# CogVideoX (2b layout)
# --------------------------------------------------------------------------------------------

COGVIDEOX_TRANSFORMER_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=8,
    text_embed_dim=16,
    num_layers=2,
    dropout=0.0,
    attention_bias=True,
    sample_width=8,  # latent; default call = 64 px
    sample_height=8,
    sample_frames=17,  # -> 5 latent frames
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
)

COGVIDEOX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    latent_channels=LATENT_CHANNELS,
    layers_per_block=1,
    act_fn="silu",
    norm_eps=1e-6,
    norm_num_groups=4,
    temporal_compression_ratio=4,
    sample_height=64,
    sample_width=64,
    scaling_factor=1.15258426,  # THUDM/CogVideoX-2b
)

# THUDM/CogVideoX-2b scheduler/scheduler_config.json
COGVIDEOX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    clip_sample_range=1.0,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="v_prediction",
    sample_max_value=1.0,
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
    snr_shift_scale=3.0,
)


def tiny_cogvideox_pipeline(
    *,
    num_layers: int = 2,
    max_text_seq_length: int = 226,
    seed: int = 0,
    scheduler: str = "ddim",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> CogVideoXPipeline:
    """Text-to-video ``CogVideoXPipeline`` (CogVideoX-2b layout) with random weights.

    2 heads x 16, patch 2, T5 d_model 16. The transformer's ``max_text_seq_length`` (226, as
    released) must equal the call's ``max_sequence_length`` (pipeline default 226); pass both
    smaller to shorten the text prefix. ``scheduler``: ``"ddim"`` (CogVideoXDDIMScheduler, released
    config) or ``"dpm"`` (CogVideoXDPMScheduler, same config). CFG is batched [uncond, cond].
    Default call size: 64x64 px, 49 frames -> override with ``num_frames``/``height``/``width``.
    """
    transformer = _seeded(
        seed,
        lambda: CogVideoXTransformer3DModel(
            **dict(COGVIDEOX_TRANSFORMER_CONFIG, num_layers=num_layers, max_text_seq_length=max_text_seq_length)
        ),
    )
    vae = _seeded(seed + 1, lambda: AutoencoderKLCogVideoX(**COGVIDEOX_VAE_CONFIG))
    t5 = dict(T5_CONFIG, d_model=16, d_kv=4, d_ff=32)
    text_encoder = _seeded(seed + 2, lambda: T5EncoderModel(T5Config(**t5)))
    if scheduler == "ddim":
        sched = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER_CONFIG)
    elif scheduler == "dpm":
        sched = CogVideoXDPMScheduler(**COGVIDEOX_SCHEDULER_CONFIG)
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'dpm', got {scheduler!r}")
    pipe = CogVideoXPipeline(
        tokenizer=build_tokenizer(max_text_seq_length),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=sched,
    )
    return _finish(pipe, dtype, device)


# --------------------------------------------------------------------------------------------
# HunyuanVideo
# --------------------------------------------------------------------------------------------

HUNYUAN_TRANSFORMER_CONFIG = dict(
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=16,  # = Llama hidden size
    pooled_projection_dim=8,  # = CLIP hidden size
    rope_theta=256.0,
    rope_axes_dim=(4, 6, 6),
)

HUNYUAN_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=LATENT_CHANNELS,
    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
    up_block_types=("HunyuanVideoUpBlock3D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    act_fn="silu",
    norm_num_groups=4,
    scaling_factor=0.476986,
    spatial_compression_ratio=8,
    temporal_compression_ratio=4,
    mid_block_add_attention=False,
)

# Llama-3 pre-tokenizer regex and header special tokens (as in llava-llama-3-8b, HunyuanVideo's
# text encoder): with them the pipeline's default template is exactly 95 tokens = its crop_start.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

LLAMA_CONFIG = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,  # the pipeline takes hidden_states[-3]
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    attention_bias=False,
    tie_word_embeddings=False,
)

CLIP_CONFIG = dict(
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=8,
)

# hunyuanvideo-community/HunyuanVideo scheduler: flow matching Euler with shift 7.
HUNYUAN_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=7.0)


def build_llama_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """An offline Llama-3-like tokenizer: Llama-3 split regex, word-level vocab over the pieces of
    HunyuanVideo's prompt template and ``TOKENIZER_WORDS`` (bare and with a leading space),
    ``<|begin_of_text|>`` prepended, right padding with ``<|end_of_text|>``."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    vocab = {"<unk>": 0}
    for t in LLAMA_SPECIAL:
        vocab[t] = len(vocab)
    pieces = [p for p, _ in split.pre_tokenize_str(DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", ""))]
    for w in pieces + [v for w in TOKENIZER_WORDS for v in (w, " " + w)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(LLAMA_SPECIAL)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_clip_tokenizer(model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """An offline CLIP-like tokenizer: lowercase word-level, ``<|startoftext|> ... <|endoftext|>``,
    padded with ``<|endoftext|>`` (ids: pad/eos 1, bos 0, unk 2)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for w in TOKENIZER_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        pair="<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def tiny_hunyuan_video_pipeline(
    *,
    num_layers: int = 1,
    num_single_layers: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> HunyuanVideoPipeline:
    """Text-to-video ``HunyuanVideoPipeline`` with random weights.

    Dual-stream + single-stream blocks (2 heads x 16), patch 2 / temporal patch 1, guidance
    embedding (``guidance_scale`` is distilled guidance: one transformer call per step; true CFG
    needs ``true_cfg_scale > 1`` and a ``negative_prompt``). Llama encoder (hidden 16, 3 layers,
    the pipeline's default template and ``max_sequence_length=256`` work as released) and CLIP text
    encoder (hidden 8) for the pooled projection.
    """
    transformer = _seeded(
        seed,
        lambda: HunyuanVideoTransformer3DModel(
            **dict(HUNYUAN_TRANSFORMER_CONFIG, num_layers=num_layers, num_single_layers=num_single_layers)
        ),
    )
    vae = _seeded(seed + 1, lambda: AutoencoderKLHunyuanVideo(**HUNYUAN_VAE_CONFIG))
    tokenizer = build_llama_tokenizer()
    llama = dict(LLAMA_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = _seeded(seed + 2, lambda: LlamaModel(LlamaConfig(**llama)))
    tokenizer_2 = build_clip_tokenizer()
    clip = dict(CLIP_CONFIG, vocab_size=len(tokenizer_2), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder_2 = _seeded(seed + 3, lambda: CLIPTextModel(CLIPTextConfig(**clip)))
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**HUNYUAN_SCHEDULER_CONFIG),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    return _finish(pipe, dtype, device)
