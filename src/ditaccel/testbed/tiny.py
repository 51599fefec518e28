"""Offline, randomly initialised diffusers pipelines for tests and CPU demos.

Everything is built from the config dicts below; nothing is downloaded. Weights are
random but seeded, so the same seed gives bit-identical weights.

Sizes:
  * ``tiny_*``  -- a few thousand parameters, a full 4-8 step generation in well under a second.
  * ``demo_*``  -- 1024 visual tokens (64x64 latent, patch 2), hidden 256, so self-attention
    dominates; still a few seconds per 8-step CFG generation on a 2-core CPU.

Both families use the same structure as the released checkpoints (DiT-XL-2-256, PixArt-Sigma-XL-2):
a 4-level (8x) KL VAE, learned-sigma transformers (out_channels = 2 * in_channels), T5 v1.1 style
(gated-gelu) text encoder for PixArt, and the released scheduler configs.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

__all__ = [
    "DIT_LABELS",
    "TOKENIZER_WORDS",
    "build_tokenizer",
    "demo_dit_pipeline",
    "demo_pixart_sigma_pipeline",
    "random_prompt_embeds",
    "tiny_dit_pipeline",
    "tiny_pixart_sigma_pipeline",
]

# --------------------------------------------------------------------------------------------
# Config dicts
# --------------------------------------------------------------------------------------------

# 4 levels -> vae_scale_factor 8, as in the SD / SDXL VAEs the real models use. Few channels and
# no mid-block attention keep the decode cheap (and keep VAE attention out of attention hooks).
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    mid_block_add_attention=False,
)
DIT_VAE_SCALING = 0.18215  # stabilityai/sd-vae-ft-ema
PIXART_VAE_SCALING = 0.13025  # SDXL VAE (pixart_sigma_sdxlvae_T5_diffusers)

# facebook/DiT-XL-2-256 ships a DDIMScheduler with this config; its model card swaps in
# DPMSolverMultistepScheduler.from_config(...), which is our default ("dpm").
DIT_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
)

DIT_TRANSFORMER_CONFIG = dict(
    in_channels=4,
    out_channels=8,  # learned sigma
    num_embeds_ada_norm=1000,  # must stay 1000: DiTPipeline hard-codes the CFG null class id 1000
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    norm_eps=1e-5,
    activation_fn="gelu-approximate",
    attention_bias=True,
    dropout=0.0,
)

# A few real ImageNet ids/names so ``pipe.get_label_ids([...])`` works.
DIT_LABELS = {
    0: "tench, Tinca tinca",
    1: "goldfish, Carassius auratus",
    88: "macaw",
    207: "golden retriever",
    279: "arctic fox, white fox, Alopex lagopus",
    360: "otter",
    387: "lesser panda, red panda, panda, bear cat, cat bear, Ailurus fulgens",
    417: "balloon",
    812: "space shuttle",
    974: "geyser",
}

# PixArt-Sigma-XL-2-{512,1024}-MS transformer structure (tiny sizes filled in by the builders).
PIXART_TRANSFORMER_CONFIG = dict(
    in_channels=4,
    out_channels=8,  # learned sigma
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    activation_fn="gelu-approximate",
    attention_bias=True,
    attention_type="default",
    use_additional_conditions=False,  # Sigma: no resolution / aspect-ratio micro-conditions
    interpolation_scale=None,  # -> max(sample_size // 64, 1), as the model derives it
    dropout=0.0,
)

# PixArt-Sigma's released scheduler (DPM-Solver++ 2M, linear betas).
PIXART_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    prediction_type="epsilon",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
    final_sigmas_type="zero",
    thresholding=False,
    timestep_spacing="linspace",
    steps_offset=0,
)

# T5 v1.1 structure (as t5-v1_1-xxl used by PixArt), tiny.
T5_CONFIG = dict(
    vocab_size=1000,
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    is_encoder_decoder=False,
    use_cache=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# Offline word-level vocabulary: T5's special ids (pad=0, eos=1, unk=2) then common words.
TOKENIZER_WORDS = """
a an the of and with in on at to for from by is are this that it its as or
red green blue yellow orange purple pink black white gray grey brown gold silver
circle square triangle star heart line dot shape shapes pattern background
small large big tiny huge bright dark light colorful simple round sharp soft
cat dog bird fish horse cow fox panda bear otter lion tiger rabbit mouse
tree flower forest mountain river lake sea ocean beach sky cloud clouds sun moon
city street house car bus train boat ship plane rocket space road bridge
man woman child person people face portrait hand eye eyes hair
photo painting drawing sketch illustration render art style oil watercolor
realistic detailed high quality beautiful cute happy old new
sitting standing running flying swimming under over above below near next
night day morning sunset sunrise winter summer snow rain fog
one two three four five many some
, . ! ?
""".split()

TOKENIZER_MAX_LENGTH = 300  # PixArt-Sigma's max_sequence_length default

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _seeded(seed: int, make):
    """Build a module under a private RNG state seeded with ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _finish(pipe, dtype, device):
    # nn.Module.to rather than pipe.to / ModelMixin.to: diffusers 0.42 warns on *every* dtype cast
    # ("modules that should be kept in float32: []") even when there are none.
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            torch.nn.Module.to(comp, device=device, dtype=dtype).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tokenizer(model_max_length: int = TOKENIZER_MAX_LENGTH, words=TOKENIZER_WORDS) -> PreTrainedTokenizerFast:
    """An offline T5-like tokenizer: lowercase, whitespace/punctuation split, word-level vocab
    over ``words``, ``</s>`` appended, ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def _dit_scheduler(kind: str):
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(DDIMScheduler(**DIT_SCHEDULER_CONFIG).config)
    if kind == "ddim":
        return DDIMScheduler(**DIT_SCHEDULER_CONFIG)
    raise ValueError(f"scheduler must be 'dpm' or 'ddim', got {kind!r}")


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------


def tiny_dit_pipeline(
    *,
    sample_size: int = 16,
    patch_size: int = 2,
    num_layers: int = 4,
    num_heads: int = 2,
    head_dim: int = 8,
    seed: int = 0,
    scheduler: str = "dpm",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiTPipeline:
    """Class-conditional ``DiTPipeline`` with random weights.

    ``sample_size`` is the latent side; images are ``8 * sample_size`` pixels square.
    Visual tokens = ``(sample_size // patch_size) ** 2``. 1000 classes (ImageNet ids);
    ``DIT_LABELS`` names a few of them for ``pipe.get_label_ids``.
    """
    transformer = _seeded(
        seed,
        lambda: DiTTransformer2DModel(
            **DIT_TRANSFORMER_CONFIG,
            sample_size=sample_size,
            patch_size=patch_size,
            num_layers=num_layers,
            num_attention_heads=num_heads,
            attention_head_dim=head_dim,
        ),
    )
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**VAE_CONFIG, scaling_factor=DIT_VAE_SCALING))
    pipe = DiTPipeline(
        transformer=transformer, vae=vae, scheduler=_dit_scheduler(scheduler), id2label=dict(DIT_LABELS)
    )
    return _finish(pipe, dtype, device)


def demo_dit_pipeline(
    *,
    seed: int = 0,
    scheduler: str = "dpm",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiTPipeline:
    """Demo-size DiT: 64x64 latent, patch 2 -> 1024 tokens, 6 layers, 4 heads x 64 (hidden 256),
    512x512 images."""
    return tiny_dit_pipeline(
        sample_size=64, patch_size=2, num_layers=6, num_heads=4, head_dim=64,
        seed=seed, scheduler=scheduler, dtype=dtype, device=device,
    )


# --------------------------------------------------------------------------------------------
# PixArt-Sigma
# --------------------------------------------------------------------------------------------


def tiny_pixart_sigma_pipeline(
    *,
    sample_size: int = 32,
    patch_size: int = 2,
    num_layers: int = 4,
    num_heads: int = 2,
    attention_head_dim: int = 8,
    text_dim: int = 32,
    seed: int = 0,
    with_text_encoder: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PixArtSigmaPipeline:
    """Text-conditional ``PixArtSigmaPipeline`` with random weights and an offline tokenizer.

    ``sample_size`` is the latent side (images are ``8 * sample_size`` px). The pipeline's default
    ``use_resolution_binning=True`` only accepts sample_size 32/64/128/256; for other sizes call
    it with ``use_resolution_binning=False``. ``text_dim`` is the T5 d_model (= caption_channels).
    With ``with_text_encoder=False`` tokenizer and text encoder are ``None``; feed
    ``random_prompt_embeds(...)`` instead of a prompt.
    """
    hidden = num_heads * attention_head_dim
    transformer = _seeded(
        seed,
        lambda: PixArtTransformer2DModel(
            **PIXART_TRANSFORMER_CONFIG,
            sample_size=sample_size,
            patch_size=patch_size,
            num_layers=num_layers,
            num_attention_heads=num_heads,
            attention_head_dim=attention_head_dim,
            cross_attention_dim=hidden,
            caption_channels=text_dim,
        ),
    )
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**VAE_CONFIG, scaling_factor=PIXART_VAE_SCALING))
    tokenizer = text_encoder = None
    if with_text_encoder:
        t5 = dict(T5_CONFIG, d_model=text_dim, d_ff=2 * text_dim, d_kv=text_dim // T5_CONFIG["num_heads"])
        text_encoder = _seeded(seed + 2, lambda: T5EncoderModel(T5Config(**t5)))
        tokenizer = build_tokenizer()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG),
    )
    return _finish(pipe, dtype, device)


def demo_pixart_sigma_pipeline(
    *,
    seed: int = 0,
    with_text_encoder: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PixArtSigmaPipeline:
    """Demo-size PixArt-Sigma: 64x64 latent, patch 2 -> 1024 tokens, 6 layers, 4 heads x 64
    (hidden 256), T5 d_model 64, 512x512 images."""
    return tiny_pixart_sigma_pipeline(
        sample_size=64, patch_size=2, num_layers=6, num_heads=4, attention_head_dim=64, text_dim=64,
        seed=seed, with_text_encoder=with_text_encoder, dtype=dtype, device=device,
    )


def random_prompt_embeds(pipe: PixArtSigmaPipeline, batch: int = 1, seq_len: int = 16, seed: int = 0):
    """Random T5-like conditioning for a PixArt pipeline built without text encoder.

    Returns ``(prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
    negative_prompt_attention_mask)``; pass them by those keyword names together with
    ``prompt=None, negative_prompt=None`` (the pipeline's ``negative_prompt`` defaults to ``""``,
    which it refuses alongside ``negative_prompt_embeds``).
    Prompt masks keep a random number (>= 1) of leading tokens; the negative mask keeps one token
    (like the encoding of the empty prompt: just ``</s>``).
    """
    cfg = pipe.transformer.config
    dtype, device = pipe.transformer.dtype, pipe.transformer.device
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, cfg.caption_channels)
    emb = torch.randn(shape, generator=g)
    neg = torch.randn(shape, generator=g)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=g)
    pos = torch.arange(seq_len)
    mask = (pos[None] < lengths[:, None]).long()
    neg_mask = (pos[None] < 1).long().expand(batch, -1).clone()
    return (
        emb.to(device=device, dtype=dtype),
        mask.to(device),
        neg.to(device=device, dtype=dtype),
        neg_mask.to(device),
    )
