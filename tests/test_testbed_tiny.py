import numpy as np
import pytest
import torch
from PIL import Image

from ditaccel.testbed import (
    DIT_LABELS,
    build_tokenizer,
    random_prompt_embeds,
    tiny_dit_pipeline,
    tiny_pixart_sigma_pipeline,
)


@pytest.fixture(scope="module")
def dit():
    return tiny_dit_pipeline()


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart_sigma_pipeline()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ DiT


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_dit_generates_pt(dit, guidance_scale):
    labels = dit.get_label_ids(["goldfish", "otter"])
    assert labels == [1, 360]
    img = dit(class_labels=labels, num_inference_steps=4, guidance_scale=guidance_scale,
              generator=_gen(0), output_type="pt").images
    assert img.shape == (2, 3, 128, 128)
    assert img.dtype == torch.float32
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1


def test_dit_generates_pil(dit):
    imgs = dit(class_labels=[207], num_inference_steps=4, generator=_gen(0)).images
    assert len(imgs) == 1 and isinstance(imgs[0], Image.Image) and imgs[0].size == (128, 128)


def test_dit_ddim_and_sizes():
    pipe = tiny_dit_pipeline(sample_size=8, num_layers=2, scheduler="ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    img = pipe(class_labels=[0], num_inference_steps=4, generator=_gen(0), output_type="pt").images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    with pytest.raises(ValueError):
        tiny_dit_pipeline(scheduler="nope")


def test_dit_structure(dit):
    cfg = dit.transformer.config
    assert cfg.out_channels == 2 * cfg.in_channels
    assert cfg.num_embeds_ada_norm == 1000
    assert (cfg.sample_size // cfg.patch_size) ** 2 == 64
    assert not dit.transformer.training and not dit.vae.training
    assert set(DIT_LABELS) <= set(dit.labels.values())


def test_dit_determinism(dit):
    assert _same_state(dit.transformer, tiny_dit_pipeline().transformer)
    assert _same_state(dit.vae, tiny_dit_pipeline().vae)
    assert not _same_state(dit.transformer, tiny_dit_pipeline(seed=1).transformer)
    a = dit(class_labels=[1, 2], num_inference_steps=4, generator=_gen(3), output_type="pt").images
    b = dit(class_labels=[1, 2], num_inference_steps=4, generator=_gen(3), output_type="pt").images
    assert torch.equal(a, b)


def test_builder_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_dit_pipeline(num_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_dtype_argument():
    pipe = tiny_dit_pipeline(num_layers=1, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    img = pipe(class_labels=[0], num_inference_steps=2, generator=_gen(0), output_type="pt").images
    assert torch.isfinite(img.float()).all()


# ------------------------------------------------------------------ PixArt-Sigma


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0])
def test_pixart_generates_pt(pixart, guidance_scale):
    img = pixart(prompt=["a red circle"], num_inference_steps=4, max_sequence_length=16,
                 guidance_scale=guidance_scale, clean_caption=False, generator=_gen(0),
                 output_type="pt").images
    assert img.shape == (1, 3, 256, 256)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1


def test_pixart_default_call(pixart):
    # The call from the brief, with the pipeline's defaults (resolution binning, clean_caption).
    img = pixart(prompt=["a red circle"], num_inference_steps=4, max_sequence_length=16, output_type="pt").images
    assert img.shape == (1, 3, 256, 256)


def test_pixart_generates_pil_batch(pixart):
    imgs = pixart(prompt=["a red circle", "a blue square on a white background"], negative_prompt="dark",
                  num_inference_steps=4, max_sequence_length=16, clean_caption=False, generator=_gen(0)).images
    assert len(imgs) == 2 and all(isinstance(i, Image.Image) and i.size == (256, 256) for i in imgs)


def test_pixart_truncation_path(pixart):
    long_prompt = " ".join(["red circle"] * 20)
    img = pixart(prompt=long_prompt, num_inference_steps=2, max_sequence_length=8, clean_caption=False,
                 generator=_gen(0), output_type="np").images
    assert img.shape == (1, 256, 256, 3) and np.isfinite(img).all()


def test_pixart_small_sample_size_without_binning():
    pipe = tiny_pixart_sigma_pipeline(sample_size=16, num_layers=2)
    img = pipe(prompt="a cat", num_inference_steps=2, max_sequence_length=8, clean_caption=False,
               use_resolution_binning=False, generator=_gen(0), output_type="pt").images
    assert img.shape == (1, 3, 128, 128)


def test_pixart_structure(pixart):
    cfg = pixart.transformer.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    assert cfg.norm_type == "ada_norm_single" and cfg.use_additional_conditions is False
    assert cfg.cross_attention_dim == hidden
    assert cfg.caption_channels == pixart.text_encoder.config.d_model
    assert cfg.out_channels == 2 * cfg.in_channels
    assert pixart.vae_scale_factor == 8
    assert not pixart.text_encoder.training and not pixart.transformer.training


def test_pixart_determinism(pixart):
    other = tiny_pixart_sigma_pipeline()
    for name in ("transformer", "vae", "text_encoder"):
        assert _same_state(getattr(pixart, name), getattr(other, name)), name
    kw = dict(prompt="a red circle", num_inference_steps=4, max_sequence_length=16, clean_caption=False,
              output_type="pt")
    a = pixart(generator=_gen(7), **kw).images
    b = other(generator=_gen(7), **kw).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0])
def test_pixart_without_text_encoder(guidance_scale):
    pipe = tiny_pixart_sigma_pipeline(with_text_encoder=False)
    assert pipe.tokenizer is None and pipe.text_encoder is None
    pe, pm, ne, nm = random_prompt_embeds(pipe, batch=2, seq_len=12, seed=0)
    assert pe.shape == ne.shape == (2, 12, pipe.transformer.config.caption_channels)
    assert pm.shape == nm.shape == (2, 12) and pm[:, 0].all() and nm.sum() == 2
    # negative_prompt defaults to "" in the pipeline and conflicts with negative_prompt_embeds.
    kw = dict(prompt=None, negative_prompt=None, prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
              negative_prompt_attention_mask=nm, guidance_scale=guidance_scale, num_inference_steps=4,
              output_type="pt")
    a = pipe(generator=_gen(0), **kw).images
    b = pipe(generator=_gen(0), **kw).images
    assert a.shape == (2, 3, 256, 256) and torch.isfinite(a).all() and torch.equal(a, b)
    again = random_prompt_embeds(pipe, batch=2, seq_len=12, seed=0)
    assert all(torch.equal(x, y) for x, y in zip((pe, pm, ne, nm), again))
    # Same transformer weights with or without the text encoder.
    assert _same_state(pipe.transformer, tiny_pixart_sigma_pipeline().transformer)


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_offline():
    tok = build_tokenizer()
    enc = tok("A Red circle, zorblax!", padding="max_length", max_length=12, truncation=True,
              add_special_tokens=True, return_tensors="pt")
    ids, mask = enc.input_ids[0].tolist(), enc.attention_mask[0].tolist()
    assert len(ids) == 12 and mask == [1] * 7 + [0] * 5
    assert ids[4] == tok.unk_token_id == 2  # out-of-vocabulary word
    assert ids[6] == tok.eos_token_id == 1 and ids[7:] == [tok.pad_token_id] * 5 == [0] * 5
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle , !"
    assert tok.batch_decode([ids[:3]]) == ["a red circle"]
    short = tok("red " * 30, max_length=5, truncation=True).input_ids
    assert len(short) == 5 and short[-1] == tok.eos_token_id
    assert max(tok.get_vocab().values()) < 1000  # fits the tiny T5 vocab
