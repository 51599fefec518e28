import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # 2 threads on a shared 2-core box wait on each other: 1 is faster and stable
logging.getLogger("diffusers").setLevel(logging.ERROR)

from ditaccel.testbed import tiny_dit_pipeline, tiny_pixart_sigma_pipeline  # noqa: E402

STEPS = 6


def run_main(main, argv):
    """(exit code, stdout, stderr) of a command's ``main(argv)``."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def toy_weights(tmp_path_factory):
    """Toy-trained testbed weights (image, video and both classifiers), trained once per session."""
    from ditaccel.testbed.train import train_classifiers, train_image, train_video

    root = tmp_path_factory.mktemp("toy-weights")
    train_classifiers(root, toy=True, progress=False)
    train_image(root / "image", toy=True, progress=False)
    train_video(root / "video", toy=True, progress=False)
    return root


@pytest.fixture(scope="session")
def dit():
    return tiny_dit_pipeline(sample_size=8, num_layers=3)


@pytest.fixture(scope="session")
def pixart():
    return tiny_pixart_sigma_pipeline(sample_size=16, num_layers=3)


def dit_call(pipe, labels=(1, 2), steps=STEPS, seed=0, **kw):
    return pipe(class_labels=list(labels), num_inference_steps=steps, generator=gen(seed), output_type="pt",
                **kw).images


def pixart_call(pipe, prompts=("a red circle", "a blue square"), steps=STEPS, seed=0, **kw):
    kw.setdefault("max_sequence_length", 16)
    kw.setdefault("use_resolution_binning", False)
    return pipe(prompt=list(prompts), num_inference_steps=steps, generator=gen(seed), output_type="pt",
                clean_caption=False, **kw).images


def tiny_clip():
    """A tiny random CLIP model and its processor, built offline (torchmetrics' CLIPScore contract)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ditaccel.testbed.video import build_clip_tokenizer

    tok = build_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return model, CLIPProcessor(image_processor=images, tokenizer=tok)


def tiny_hunyuan_transformer():
    """A tiny random HunyuanVideo transformer (seeded): 1 dual- and 1 single-stream block, 2 heads x 16."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)).eval()
