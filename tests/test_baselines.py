"""ditaccel.baselines: diffusers' caches as baselines, and the measured FLOP counts.

Tiny random pipelines (DiT with the glue, CogVideoX natively) for the mechanics; the shipped
testbeds for the applicability table and one short run on the image testbed.
"""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditaccel import baselines as B
from ditaccel.testbed import tiny_dit_pipeline
from ditaccel.testbed.pixel import load_image_pipeline, load_video_pipeline
from ditaccel.testbed.video import tiny_cogvideox_pipeline

STEPS = 8
COG_SIZE = dict(num_frames=9, height=32, width=32, max_sequence_length=16)  # 3 latent frames of 4x4, patch 2: 12 video tokens


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def dit():
    return tiny_dit_pipeline(sample_size=8, num_layers=3)


@pytest.fixture(scope="module")
def cog():
    return tiny_cogvideox_pipeline(num_layers=3, max_text_seq_length=16)


def dit_kw(seed=0, steps=STEPS):
    return dict(class_labels=[1, 2], num_inference_steps=steps, generator=gen(seed), output_type="pt")


def cog_kw(seed=0, steps=STEPS):
    return dict(prompt=["a red cat"], num_inference_steps=steps, generator=gen(seed), output_type="latent",
                **COG_SIZE)


def run(pipe, kw):
    m = B.measure_flops(pipe, kw)
    out = m.pop("output")
    return (out.images if hasattr(out, "images") else out.frames), m


def settings(pipe, glue):
    extra = {} if glue else {"call_kwargs": dict(COG_SIZE)}
    return B.cache_settings(pipe, STEPS, glue=glue, **extra)


# ====================================================================== applicability
def test_applicability_testbeds():
    image, video = load_image_pipeline(), load_video_pipeline()
    native = B.applicability(image)
    assert set(native) == set(B.CACHE_NAMES)
    for name in ("FirstBlockCache", "TaylorSeer", "MagCache", "PyramidAttentionBroadcast"):
        assert "DiTTransformer2DModel has no enable_cache" in native[name], native[name]
    assert "No cache context is set" in native["FirstBlockCache"]
    assert "No cache context is set" in native["TaylorSeer"]
    assert "never resets hook state" in native["MagCache"]
    assert "no current_timestep" in native["PyramidAttentionBroadcast"]
    assert "[cond, uncond]" in native["FasterCache"] and "[uncond, cond]" in native["FasterCache"]
    assert all("\n" not in r for r in native.values())

    glued = B.applicability(image, glue=True)
    assert [n for n, r in glued.items() if r is None] == ["FirstBlockCache", "TaylorSeer", "MagCache",
                                                          "PyramidAttentionBroadcast"]
    assert glued["FasterCache"] == native["FasterCache"]

    assert B.applicability(video) == dict.fromkeys(B.CACHE_NAMES)
    assert B.cache_settings(image, 50) == []  # nothing native on DiT
    labels = [s.label for s in B.cache_settings(image, 50, glue=True)]
    assert labels and all(label.endswith("[glue]") for label in labels)
    video_settings = B.cache_settings(video, 50)
    assert {s.name for s in video_settings} == set(B.CACHE_NAMES)
    assert not any(s.glue for s in video_settings)
    for name in B.CACHE_NAMES:
        assert 3 <= sum(s.name == name for s in video_settings) <= 4


def test_taylorseer_default_identifiers_hook_nothing(cog):
    """Why our TaylorSeer settings pass cache_identifiers: the defaults match no CogVideoX module."""
    from diffusers import TaylorSeerCacheConfig

    ref, _ = run(cog, cog_kw())
    cog.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
    try:
        hooked = [n for n, m in cog.transformer.named_modules()
                  if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks]
        out, _ = run(cog, cog_kw())
    finally:
        cog.transformer.disable_cache()
    assert hooked == []
    assert torch.equal(out, ref)


# ====================================================================== caches bite, disable restores
def _check_bites(pipe, kw, setting):
    ref, dense = run(pipe, kw())
    B.enable(pipe, setting)
    try:
        assert B.enabled_setting(pipe) == setting
        out, m = run(pipe, kw())
        again, _ = run(pipe, kw())  # state is reset between generations
    finally:
        B.disable(pipe)
    assert B.enabled_setting(pipe) is None
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert not torch.equal(out, ref), setting.label
    assert torch.equal(again, out), setting.label
    assert m["total_flops"] < dense["total_flops"], (setting.label, m, dense)
    assert m["transformer_calls"] == dense["transformer_calls"] == STEPS
    after, _ = run(pipe, kw())
    assert torch.equal(after, ref), setting.label  # bit-identical to never having enabled
    return m, dense


@pytest.mark.parametrize("name", B.CACHE_NAMES)
def test_cache_bites_cogvideox(cog, name):
    chosen = [s for s in settings(cog, glue=False) if s.name == name]
    assert len(chosen) >= 3
    m, dense = _check_bites(cog, cog_kw, chosen[-1])  # the most aggressive
    if name in ("FirstBlockCache", "MagCache"):
        assert m["block_calls"] < dense["block_calls"]
    if name in ("PyramidAttentionBroadcast", "TaylorSeer"):
        assert m["attention_calls"] < dense["attention_calls"]


@pytest.mark.parametrize("name", ["FirstBlockCache", "TaylorSeer", "MagCache", "PyramidAttentionBroadcast"])
def test_cache_bites_dit_glue(dit, name):
    chosen = [s for s in settings(dit, glue=True) if s.name == name]
    assert len(chosen) >= 3 and all(s.glue for s in chosen)
    _check_bites(dit, dit_kw, chosen[-1])


def test_schedule_caches_every_strength_skips(cog):
    """TaylorSeer, PAB and FasterCache skip by schedule: every strength must skip something, and
    a stronger one no less (FLOPs non-increasing along the list)."""
    for name in ("TaylorSeer", "PyramidAttentionBroadcast", "FasterCache"):
        costs = []
        for s in [s for s in settings(cog, glue=False) if s.name == name]:
            B.enable(cog, s)
            try:
                costs.append(run(cog, cog_kw())[1]["total_flops"])
            finally:
                B.disable(cog)
        dense = run(cog, cog_kw())[1]["total_flops"]
        assert all(c < dense for c in costs), (name, costs, dense)
        assert costs == sorted(costs, reverse=True), (name, costs)


def test_testbed_image_glue_pab():
    pipe = load_image_pipeline()

    def kw():
        return dict(class_labels=[3, 9], num_inference_steps=5, guidance_scale=4.0, generator=gen(1),
                    output_type="pt")

    setting = B.make_setting("PyramidAttentionBroadcast", 5, glue=True, block_skip_range=2,
                             timestep_skip_range=(-1, 1000))
    ref, dense = run(pipe, kw())
    B.enable(pipe, setting)
    try:
        out, m = run(pipe, kw())
    finally:
        B.disable(pipe)
    assert not torch.equal(out, ref)
    # PAB recomputes a layer's attention when iteration % 2 == 0: steps 0, 2, 4 of 5, in 6 layers
    assert (m["attention_calls"], dense["attention_calls"]) == (3 * 6, 5 * 6)
    assert m["total_flops"] < dense["total_flops"]
    assert m["attention_flops"] * 5 == dense["attention_flops"] * 3
    assert torch.equal(run(pipe, kw())[0], ref)


# ====================================================================== MagCache calibration
def test_mag_ratios_match_an_independent_count(cog):
    ratios = B.calibrate_mag_ratios(cog, STEPS, **COG_SIZE)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    assert B.calibrate_mag_ratios(cog, STEPS, **COG_SIZE) is ratios  # memoised

    # the same run (calibration inputs) with our own hooks: residual = last block out - first block in
    blocks = cog.transformer.transformer_blocks
    residuals, first_in = [], []
    h0 = blocks[0].register_forward_pre_hook(lambda m, a, k: first_in.append(k["hidden_states"]), with_kwargs=True)
    h1 = blocks[-1].register_forward_hook(lambda m, a, out: residuals.append(out[0] - first_in[-1]))
    try:
        cog(num_inference_steps=STEPS, **B.calibration_kwargs(cog), **COG_SIZE)
    finally:
        h0.remove()
        h1.remove()
    expected = [1.0] + [
        (torch.linalg.norm(cur, dim=-1) / (torch.linalg.norm(prev, dim=-1) + 1e-8)).mean().item()
        for prev, cur in zip(residuals, residuals[1:])
    ]
    assert ratios == pytest.approx(expected, rel=1e-5)


def test_mag_ratios_of_another_length_are_interpolated(cog):
    s = B.make_setting("MagCache", STEPS, mag_ratios=[1.0, 0.9, 0.95, 1.0])
    assert s.config(cog).mag_ratios.tolist() == pytest.approx([1.0, 1.0, 0.9, 0.9, 0.95, 0.95, 1.0, 1.0])


def test_calibration_inputs_are_not_evaluation_inputs(dit):
    kw = B.calibration_kwargs(dit)
    assert kw["generator"].initial_seed() == B.CALIBRATION_SEED not in (0, 1, 2, 3, 10_007, 1_000_003)


# ====================================================================== FLOPs
def test_flops_dense_tiny_dit_analytic(dit):
    t = dit.transformer.config
    steps, labels = 3, [1, 2]
    Bt = 2 * len(labels)  # CFG-batched call
    H, d, N, p = t.num_attention_heads, t.attention_head_dim, t.num_layers, t.patch_size
    D = H * d
    L = (t.sample_size // p) ** 2
    emb = 2 * Bt * (256 * D + D * D)  # timestep embedder: 256 -> D -> D
    per_block = (emb + 2 * Bt * D * 6 * D  # adaLN-Zero modulation
                 + 2 * Bt * L * 4 * D * D  # q, k, v, out
                 + 2 * Bt * L * 8 * D * D  # feed-forward D -> 4D -> D
                 + 4 * Bt * H * L * L * d)  # attention core
    per_call = (2 * Bt * L * t.in_channels * p * p * D  # patch embedding
                + N * per_block
                + emb + 2 * Bt * D * 2 * D  # output modulation
                + 2 * Bt * L * D * p * p * t.out_channels)
    m = B.measure_flops(dit, dict(class_labels=labels, num_inference_steps=steps, generator=gen(),
                                  output_type="pt"))
    assert m["total_flops"] == pytest.approx(steps * per_call, rel=0.01)
    assert m["attention_flops"] == steps * N * 4 * Bt * H * L * L * d
    assert m["pipeline_flops"] > m["total_flops"]  # the VAE decode is outside the transformer
    assert (m["transformer_calls"], m["block_calls"], m["attention_calls"]) == (steps, steps * N, steps * N)


def test_plain_flopcounter_misses_cpu_sdpa():
    """Why measure_flops maps the CPU SDPA kernel: torch has no formula for it."""
    q = torch.randn(1, 2, 16, 8)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == 0, "torch now counts CPU SDPA: measure_flops' custom mapping can go"


def test_flops_cogvideox_attention_share(cog):
    _, m = run(cog, cog_kw(steps=2))
    t = cog.transformer.config
    L = 3 * 2 * 2 + 16  # video + text tokens, joint attention
    Bt = 2
    assert m["attention_flops"] == 2 * t.num_layers * 4 * Bt * t.num_attention_heads * L * L * t.attention_head_dim
    assert 0 < m["attention_flops"] < m["total_flops"] < m["pipeline_flops"]  # T5 and VAE are outside


# ====================================================================== errors
@pytest.mark.parametrize("args, kwargs, param", [
    (("FirstBlockCahce", 10), {}, "name"),
    (("FirstBlockCache", 0), {}, "num_inference_steps"),
    (("FirstBlockCache", 10), {"thresh": 0.1}, "thresh"),
    (("FirstBlockCache", 10), {"threshold": -0.1}, "threshold"),
    (("FirstBlockCache", 10), {"mag_ratios": [1.0, 0.9]}, "mag_ratios"),
    (("TaylorSeer", 10), {"cache_interval": 0}, "cache_interval"),
    (("MagCache", 10), {"retention_ratio": 1.5}, "retention_ratio"),
    (("MagCache", 10), {"mag_ratios": [1.0, float("nan")]}, "mag_ratios"),
    (("PyramidAttentionBroadcast", 10), {"block_skip_range": 1}, "block_skip_range"),
    (("PyramidAttentionBroadcast", 10), {"timestep_skip_range": (800, 100)}, "timestep_skip_range"),
    (("FasterCache", 10), {"uncond_skip_range": 2.5}, "uncond_skip_range"),
])
def test_bad_setting_names_a_parameter(args, kwargs, param):
    with pytest.raises(ValueError) as e:
        B.make_setting(*args, **kwargs)
    msg = str(e.value)
    assert msg.startswith(f"{param}:") and "\n" not in msg, msg


def test_enable_errors(dit, cog):
    with pytest.raises(ValueError, match=r"^setting: expected a CacheSetting"):
        B.enable(dit, "FirstBlockCache")
    with pytest.raises(ValueError, match=r"^setting: FasterCache does not apply to DiTPipeline: .*\[cond, uncond\]"):
        B.enable(dit, B.make_setting("FasterCache", STEPS, glue=True))
    with pytest.raises(ValueError, match=r"^setting: FirstBlockCache does not apply .* no enable_cache"):
        B.enable(dit, B.make_setting("FirstBlockCache", STEPS))  # without the glue
    s = B.make_setting("FirstBlockCache", STEPS, threshold=0.1)
    B.enable(cog, s)
    try:
        with pytest.raises(ValueError, match=r"^setting: 'FirstBlockCache t=0.1' is already enabled"):
            B.enable(cog, s)
    finally:
        B.disable(cog)
    B.disable(cog)  # nothing enabled: a no-op
    with pytest.raises(ValueError, match=r"^num_inference_steps:"):
        B.cache_settings(cog, 0)
