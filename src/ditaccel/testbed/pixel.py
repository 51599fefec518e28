"""Pixel-space pipelines and configs of the trained testbed models.

The testbed models denoise pixels directly (no autoencoder): at 64x64 with simple procedural
content a pixel-space DiT is small, trains in minutes and adds no VAE error to the quality
numbers, so a PSNR drop measures the attention method alone.

diffusers' ``DiTPipeline`` and ``CogVideoXPipeline`` always decode through a VAE, and
``DiTPipeline`` also hard-codes ImageNet's CFG null class (1000). An "identity VAE" module would
be a fake component, so instead each gets a thin subclass that changes only what pixel space
needs:

* ``PixelDiTPipeline(DiTPipeline)``: components ``transformer`` + ``scheduler``; ``__call__`` is
  ``DiTPipeline.__call__`` (same signature, same CFG batch order [cond, uncond], same learned-
  sigma handling) with the null class taken from the model (``num_embeds_ada_norm``) and the VAE
  decode removed.
* ``PixelCogVideoXPipeline(CogVideoXPipeline)``: components ``tokenizer``, ``text_encoder``,
  ``transformer``, ``scheduler``; spatial/temporal scale factors 1, ``decode_latents`` returns the
  denoised frames, and ``max_sequence_length`` defaults to the transformer's
  ``max_text_seq_length``. Everything else (T5 prompt encoding, CFG [uncond, cond], the CogVideoX
  schedulers, the callbacks) is the parent's code.

Both save and load with diffusers' own ``save_pretrained`` / ``from_pretrained(local_dir)``
(``model_index.json`` + one folder per component, safetensors weights, JSON configs).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from diffusers import CogVideoXPipeline, DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import PreTrainedTokenizerFast

from .data import ImageClasses, VideoCaptions
from .tiny import DIT_SCHEDULER_CONFIG, T5_CONFIG, build_tokenizer
from .video import COGVIDEOX_SCHEDULER_CONFIG

__all__ = [
    "IMAGE_MODEL_CONFIG",
    "IMAGE_SCHEDULER_CONFIG",
    "VIDEO_MODEL_CONFIG",
    "VIDEO_SCHEDULER_CONFIG",
    "VIDEO_TEXT_ENCODER_CONFIG",
    "WEIGHTS_DIR",
    "PixelCogVideoXPipeline",
    "PixelDiTPipeline",
    "build_caption_tokenizer",
    "load_image_pipeline",
    "load_video_pipeline",
]

#: Where the trained testbed weights ship (``image/``, ``video/``, ``image_classifier/``,
#: ``video_classifier/``).
WEIGHTS_DIR = Path(__file__).parent / "weights"

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

#: Image DiT: 64x64 RGB, patch 2 -> 32x32 = 1,024 tokens; hidden 192 = 6 heads x 32, 6 layers;
#: 12 classes + the CFG null class (id 12); epsilon prediction, no learned sigma.
#: 4.61 M parameters = 9.2 MB in fp16.
IMAGE_MODEL_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    sample_size=64,
    patch_size=2,
    num_layers=6,
    num_attention_heads=6,
    attention_head_dim=32,
    num_embeds_ada_norm=len(ImageClasses.CLASSES),
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    norm_eps=1e-5,
    activation_fn="gelu-approximate",
    attention_bias=True,
    dropout=0.0,
)

#: The released DiT schedule (facebook/DiT-XL-2-256: linear betas, epsilon); the pipeline
#: samples with DPM-Solver++ built from it, as the DiT model card does.
IMAGE_SCHEDULER_CONFIG = dict(DIT_SCHEDULER_CONFIG)

#: Video CogVideoX (2b layout: 3D sin-cos positions, LayerNorm q/k, joint [text, video]
#: self-attention): 8 frames of 48x48 RGB, patch 2 -> 8 x 24 x 24 = 4,608 video tokens + 16 text
#: tokens; hidden 192 = 3 heads x 64, 6 layers. ~4.56 M parameters = 9.1 MB in fp16. (Until
#: 2026-11-25 it was 16 frames of 64x64 at patch 4: each token then had to draw 48 pixel values
#: from one 192-wide state, and after 6k steps its samples were still blocky 4x4 mosaics with the
#: motion at chance; patch 2 gives each token 12 values, as the image DiT has.)
VIDEO_MODEL_CONFIG = dict(
    # 3 heads of 64 rather than 6 of 32 (same width): a training step ran 1.38x as fast eagerly
    # (scripts/bench_video_train.py, H100) and 16.6 against 11.3 steps/s compiled.
    num_attention_heads=3,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=128,
    text_embed_dim=64,
    num_layers=6,
    dropout=0.0,
    attention_bias=True,
    sample_width=48,
    sample_height=48,
    sample_frames=8,
    patch_size=2,
    temporal_compression_ratio=1,  # pixel space: frames are "latent" frames
    max_text_seq_length=16,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.0,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
)

#: T5 v1.1 structure (gated-gelu), tiny, trained jointly with the video transformer.
VIDEO_TEXT_ENCODER_CONFIG = dict(T5_CONFIG, d_model=64, d_kv=16, d_ff=128, relative_attention_max_distance=16)

#: THUDM/CogVideoX-2b's scheduler (v-prediction, zero terminal SNR, SNR shift 3).
VIDEO_SCHEDULER_CONFIG = dict(COGVIDEOX_SCHEDULER_CONFIG)


def build_caption_tokenizer(model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """The offline T5-like word-level tokenizer (``tiny.build_tokenizer``) over
    ``VideoCaptions.vocabulary()``."""
    return build_tokenizer(model_max_length, VideoCaptions.vocabulary())


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


class PixelDiTPipeline(DiTPipeline):
    """``DiTPipeline`` in pixel space: no VAE, CFG null class = ``transformer.config.num_embeds_ada_norm``.

    Args:
        transformer: a class-conditional ``DiTTransformer2DModel`` whose ``in_channels`` are the
            image channels.
        scheduler: any scheduler ``DiTPipeline`` accepts.
        id2label: class id -> name (``pipe.get_label_ids(["ring"])``); defaults to the testbed's
            ``ImageClasses`` names when the class count matches.
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler, id2label: dict[int, str] | None = None):
        # DiffusionPipeline.__init__, not DiTPipeline's: that one registers a vae.
        super(DiTPipeline, self).__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        if id2label is None and transformer.config.num_embeds_ada_norm == len(ImageClasses.CLASSES):
            id2label = dict(enumerate(ImageClasses.CLASSES))
        self.labels = {}
        for key, value in (id2label or {}).items():
            self.labels[value.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """``DiTPipeline.__call__`` without the VAE decode; ``images`` are pixels in [0, 1]
        (``"pt"``: (B, C, H, W); ``"np"``: (B, H, W, C); ``"pil"``: PIL images)."""
        batch_size = len(class_labels)
        size = self.transformer.config.sample_size
        channels = self.transformer.config.in_channels
        null = self.transformer.config.num_embeds_ada_norm
        device = self._execution_device
        latents = randn_tensor((batch_size, channels, size, size), generator=generator, device=device,
                               dtype=self.transformer.dtype)
        cfg = guidance_scale > 1
        model_input = torch.cat([latents] * 2) if cfg else latents
        labels = torch.tensor(class_labels, device=device).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= null):
            raise ValueError(f"class_labels must be in [0, {null}), got {class_labels}")
        labels_in = torch.cat([labels, torch.full_like(labels, null)]) if cfg else labels

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if cfg:
                half = model_input[: len(model_input) // 2]
                model_input = torch.cat([half, half], dim=0)
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t if torch.is_tensor(t) else torch.tensor([t], device=device)
            timesteps = timesteps.reshape(-1)[:1].to(device).expand(model_input.shape[0])
            noise_pred = self.transformer(model_input, timestep=timesteps, class_labels=labels_in).sample
            if cfg:
                eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
                cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
                half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
                noise_pred = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
            if self.transformer.config.out_channels // 2 == channels:  # learned sigma
                model_output, _ = torch.split(noise_pred, channels, dim=1)
            else:
                model_output = noise_pred
            model_input = self.scheduler.step(model_output, t, model_input).prev_sample

        samples = model_input.chunk(2, dim=0)[0] if cfg else model_input
        samples = (samples.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            samples = samples.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                samples = self.numpy_to_pil(samples)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)


class PixelCogVideoXPipeline(CogVideoXPipeline):
    """``CogVideoXPipeline`` in pixel space: no VAE (scale factors 1), frames are the denoised
    "latents"; ``max_sequence_length`` defaults to ``transformer.config.max_text_seq_length``.

    ``frames`` of ``output_type="pt"`` are (B, F, C, H, W) in [0, 1], as the parent returns them.
    """

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, tokenizer, text_encoder, transformer, scheduler):
        super(CogVideoXPipeline, self).__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                              scheduler=scheduler)
        self.vae_scale_factor_spatial = 1
        self.vae_scale_factor_temporal = 1
        self.vae_scaling_factor_image = 1.0
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.permute(0, 2, 1, 3, 4).float()  # (B, C, F, H, W), values in [-1, 1]

    @functools.wraps(CogVideoXPipeline.__call__)
    def __call__(self, *args, **kwargs):
        kwargs.setdefault("max_sequence_length", self.transformer.config.max_text_seq_length)
        return CogVideoXPipeline.__call__(self, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _resolve(path, name: str) -> Path:
    p = Path(path) if path is not None else WEIGHTS_DIR / name
    if not (p / "model_index.json").is_file() and not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained testbed model at {p}: train it with ditaccel.testbed.train "
            f"(train_image / train_video / train_classifiers) or pass the folder it wrote")
    return p


def _to(pipe, dtype, device):
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            torch.nn.Module.to(comp, device=device, dtype=dtype).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_image_pipeline(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> PixelDiTPipeline:
    """The trained image testbed (``PixelDiTPipeline.from_pretrained``); ``path`` defaults to the
    shipped weights (``WEIGHTS_DIR / "image"``)."""
    pipe = PixelDiTPipeline.from_pretrained(str(_resolve(path, "image")), dtype=dtype)
    return _to(pipe, dtype, device)


def load_video_pipeline(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> PixelCogVideoXPipeline:
    """The trained video testbed (``PixelCogVideoXPipeline.from_pretrained``); ``path`` defaults
    to the shipped weights (``WEIGHTS_DIR / "video"``)."""
    pipe = PixelCogVideoXPipeline.from_pretrained(str(_resolve(path, "video")), dtype=dtype)
    return _to(pipe, dtype, device)
