"""AdaSpa on the offline video test beds: real Wan / CogVideoX / HunyuanVideo pipelines, tiny weights.

Every call: 17 frames at 64x64 px -> 5 latent frames of 8x8 -> 5 x 4 x 4 = 80 video tokens
(5 blocks of 16) after the 2x2 patchify.
"""

import pytest
import torch

import ditaccel
from ditaccel.runtime import get_runtime
from ditaccel.testbed.video import tiny_cogvideox_pipeline, tiny_hunyuan_video_pipeline, tiny_wan_pipeline

STEPS = 5
FRAMES, SIZE = 17, 64
LATENT = (4, 5, 8, 8)  # channels, latent frames, height, width
PROMPT = "a red cat running in the snow"


def _call(pipe, seed=0, output_type="latent", **kw):
    return pipe(prompt=PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), output_type=output_type, **kw).frames


def _check_adaspa(pipe, kw, expected_counts, n_layers):
    ref = _call(pipe, **kw)
    ditaccel.apply(pipe, ditaccel.AdaSpaConfig(sparsity=0.0, block_size=16))
    try:
        exact = _call(pipe, **kw)
    finally:
        ditaccel.remove(pipe)
    assert get_runtime(pipe) is None
    assert torch.allclose(exact, ref, atol=1e-4), (exact - ref).abs().max()
    assert torch.equal(_call(pipe, **kw), ref)  # bit-identical after remove

    ditaccel.apply(pipe, ditaccel.AdaSpaConfig(sparsity=0.5, block_size=16))
    try:
        out = _call(pipe, **kw)
        st = ditaccel.stats(pipe)  # survives the pipeline's maybe_free_model_hooks() reset
    finally:
        ditaccel.remove(pipe)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert st.method_counts == expected_counts
    density = st.details["density_per_layer"]
    assert len(density) == n_layers and all(0 < d < 1 for d in density)
    assert torch.equal(_call(pipe, **kw), ref)


# --------------------------------------------------------------------------------------------
# Wan2.1: CFG as two transformer calls per step under cache_context("cond"/"uncond")
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline()


WAN_KW = dict(guidance_scale=5.0)


def test_wan_generates(wan):
    lat = _call(wan, **WAN_KW)
    assert lat.shape == (1, *LATENT) and torch.isfinite(lat).all()
    assert torch.equal(_call(wan, **WAN_KW), lat)  # deterministic per generator
    assert not torch.equal(_call(wan, seed=1, **WAN_KW), lat)
    video = _call(wan, output_type="pt", **WAN_KW)
    assert video.shape == (1, FRAMES, 3, SIZE, SIZE) and torch.isfinite(video).all()


def test_wan_builder_is_seeded():
    a, b, c = tiny_wan_pipeline(seed=3), tiny_wan_pipeline(seed=3), tiny_wan_pipeline(seed=4)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_wan_adaspa(wan):
    # 2 layers x 2 branches (cond / uncond keep separate state)
    _check_adaspa(wan, WAN_KW, {"dense": 4, "search": 4, "sparse": 8, "research": 4}, 2)


# --------------------------------------------------------------------------------------------
# CogVideoX: batched CFG [uncond, cond], 226 text tokens in front of the video
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cogvideox():
    return tiny_cogvideox_pipeline()


COG_KW = dict(guidance_scale=6.0)


def test_cogvideox_generates(cogvideox):
    lat = _call(cogvideox, **COG_KW)
    assert lat.shape == (1, LATENT[1], LATENT[0], *LATENT[2:]) and torch.isfinite(lat).all()  # [B, F, C, H, W]
    assert torch.equal(_call(cogvideox, **COG_KW), lat)
    video = _call(cogvideox, output_type="pt", **COG_KW)
    assert video.shape == (1, FRAMES, 3, SIZE, SIZE) and torch.isfinite(video).all()


COG_COUNTS = {"dense": 2, "search": 2, "sparse": 4, "research": 2}  # 2 layers, one batched call per step


def test_cogvideox_adaspa(cogvideox):
    _check_adaspa(cogvideox, COG_KW, COG_COUNTS, 2)


# --------------------------------------------------------------------------------------------
# HunyuanVideo: embedded (distilled) guidance = one call per step; true CFG = cond/uncond calls
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hunyuan():
    return tiny_hunyuan_video_pipeline()


def test_hunyuan_generates(hunyuan):
    lat = _call(hunyuan)
    assert lat.shape == (1, *LATENT) and torch.isfinite(lat).all()
    assert torch.equal(_call(hunyuan), lat)
    video = _call(hunyuan, output_type="pt")
    assert video.shape == (1, FRAMES, 3, SIZE, SIZE) and torch.isfinite(video).all()


def test_hunyuan_prompt_template_is_cropped_exactly(hunyuan):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE as T

    ids = hunyuan.tokenizer(T["template"].format(PROMPT)).input_ids
    tokens = hunyuan.tokenizer.convert_ids_to_tokens(ids[T["crop_start"]:])
    assert "".join(tokens) == PROMPT + "<|eot_id|>" and "<unk>" not in tokens


HUN_COUNTS = {"dense": 2, "search": 2, "sparse": 4, "research": 2}


def test_hunyuan_adaspa(hunyuan):
    # 1 dual-stream + 1 single-stream block, one transformer call per step
    _check_adaspa(hunyuan, {}, HUN_COUNTS, 2)


def test_hunyuan_adaspa_true_cfg(hunyuan):
    kw = dict(true_cfg_scale=4.0, negative_prompt="dark", max_sequence_length=16)  # short text: video dominates
    _check_adaspa(hunyuan, kw, {k: 2 * v for k, v in HUN_COUNTS.items()}, 2)


def test_stats_after_the_pipeline_call(wan):
    """Pipelines whose transformer has CacheMixin reset stateful hooks at the end of each call:
    ditaccel frees its tensors then but keeps the accounting."""
    ditaccel.apply(wan, ditaccel.AdaSpaConfig(sparsity=0.5, block_size=16))
    try:
        _call(wan, **WAN_KW)
        st = ditaccel.stats(wan)
        caches = [c for s in get_runtime(wan).state_manager._state_cache.values() for c in s.caches.values()]
    finally:
        ditaccel.remove(wan)
    assert st.steps == STEPS and st.method_counts["sparse"] > 0
    assert caches and all(c.lse is None and c.mask is None for c in caches)
