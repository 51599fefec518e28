"""Quality metrics against hand-computed values, and ``evaluate`` end to end at toy size."""

import importlib.util
import math

import numpy as np
import pytest
import torch
from conftest import tiny_clip
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
)

import ditaccel
from ditaccel.evaluate import (
    classifier_accuracy,
    evaluate,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_window,
    psnr,
    ssim,
)
from ditaccel.testbed.classifier import ImageClassifier, VideoClassifier
from ditaccel.testbed.pixel import (
    IMAGE_MODEL_CONFIG,
    IMAGE_SCHEDULER_CONFIG,
    VIDEO_SCHEDULER_CONFIG,
    PixelCogVideoXPipeline,
    PixelDiTPipeline,
)
from ditaccel.testbed.recipes import TOY_IMAGE_MODEL
from ditaccel.testbed.train import build_video_components

HAS_TORCHMETRICS = importlib.util.find_spec("torchmetrics") is not None


# ------------------------------------------------------------------------------ PSNR
def test_psnr_of_known_mse():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.1)  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert psnr(a, b) == pytest.approx(20.0)
    assert psnr(a, b, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    b[1] = 0.0  # sample 1 identical -> inf; per-sample values
    per = psnr(a, b, reduction="none")
    assert per[0].item() == pytest.approx(20.0) and math.isinf(per[1].item())
    with pytest.raises(ValueError, match="shapes"):
        psnr(a, b[:1])


# ------------------------------------------------------------------------------ SSIM
def _ssim_by_hand(x: np.ndarray, y: np.ndarray, L=1.0) -> float:
    """One 11x11 window over an 11x11 single-channel image: the textbook formula, weighted sums."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cxy = (w * (x - mx) * (y - my)).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_ssim_identical_is_one_and_constants_match_the_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 20, 20, generator=g)
    assert ssim(x, x) == pytest.approx(1.0)
    # constant images: no structure, only the luminance term (2 a b + C1) / (a² + b² + C1)
    a, b = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01**2
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1))


def test_ssim_matches_a_hand_computed_window():
    rng = np.random.default_rng(1)
    x = rng.random((11, 11))
    y = np.clip(x + 0.1 * rng.standard_normal((11, 11)), 0, 1)
    ours = ssim(torch.tensor(x)[None, None], torch.tensor(y)[None, None])
    assert ours == pytest.approx(_ssim_by_hand(x, y), abs=1e-10)
    assert gaussian_window(11).sum().item() == pytest.approx(1.0)


def test_ssim_of_videos_is_the_mean_over_frames():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 3, 4, 12, 12, generator=g)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    per_frame = torch.stack([ssim(a[:, :, f], b[:, :, f], reduction="none") for f in range(4)], 1)
    assert torch.allclose(ssim(a, b, reduction="none"), per_frame.mean(1))
    small = torch.rand(1, 3, 8, 8, generator=g)  # smaller than the window: a 7-tap window
    assert ssim(small, small) == pytest.approx(1.0)


# ------------------------------------------------------------------------------ Fréchet distance
def test_frechet_distance_of_known_gaussians():
    # diagonal (commuting) covariances: sum (sqrt a_i - sqrt b_i)² + |mu1 - mu2|²
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    expect = 1 + 0 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expect)
    # non-commuting 2x2: tr sqrt(A^½ B A^½) = sqrt(tr(AB) + 2 sqrt(det A det B))
    A = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    B = torch.diag(torch.tensor([1.0, 4.0]))
    tr_sqrt = math.sqrt(10 + 2 * math.sqrt(3 * 4))
    mu = torch.tensor([0.5, -0.5])
    assert frechet_distance_from_stats(mu, A, torch.zeros(2), B) == pytest.approx(0.5 + 4 + 5 - 2 * tr_sqrt)
    assert frechet_distance_from_stats(torch.zeros(2), A, torch.zeros(2), A) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_features_uses_sample_statistics():
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(50, 4, generator=g)
    fb = torch.randn(60, 4, generator=g) * 2 + 1
    na, nb = fa.double().numpy(), fb.double().numpy()
    expect = frechet_distance_from_stats(na.mean(0), np.cov(na, rowvar=False), nb.mean(0), np.cov(nb, rowvar=False))
    assert frechet_distance(fa, fb) == pytest.approx(expect)
    assert frechet_distance(fa, fb) == pytest.approx(frechet_distance(fb, fa))
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="2 samples"):
        frechet_distance(fa[:1], fb)


# ------------------------------------------------------------------------------ accuracy
class _FixedLogits(torch.nn.Module):
    def __init__(self, video=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.video = video

    def forward(self, x):  # predicts class = round(mean pixel * 10) on [0, 1] pixels
        cls = (((x + 1) / 2).flatten(1).mean(1) * 10).round().long()
        logits = torch.nn.functional.one_hot(cls, 12).float()
        return {"object": logits, "motion": logits.flip(-1)} if self.video else logits


def test_classifier_accuracy():
    x = torch.stack([torch.full((3, 4, 4), v) for v in (0.1, 0.2, 0.3, 0.4)])
    assert classifier_accuracy(_FixedLogits(), x, torch.tensor([1, 2, 0, 4])) == pytest.approx(0.75)
    acc = classifier_accuracy(_FixedLogits(video=True), x, {"object": torch.tensor([1, 2, 3, 0]),
                                                            "motion": torch.tensor([10, 9, 0, 0])})
    assert acc == {"object": 0.75, "motion": 0.5, "object+motion": 0.5}


# ------------------------------------------------------------------------------ evaluate at toy size
@pytest.fixture(scope="module")
def toy_image_pipe():
    torch.manual_seed(0)  # default (random) init: an untrained toy model whose attention matters
    tr = DiTTransformer2DModel(**dict(IMAGE_MODEL_CONFIG, **TOY_IMAGE_MODEL)).eval()
    sched = DPMSolverMultistepScheduler.from_config(DDIMScheduler(**IMAGE_SCHEDULER_CONFIG).config)
    pipe = PixelDiTPipeline(tr, sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def toy_image_classifier():
    torch.manual_seed(0)
    return ImageClassifier(channels=(8, 16), feature_dim=8).eval()


EXPECTED = {"kind", "method", "n", "steps", "seeds", "psnr", "psnr_min", "ssim", "ssim_min", "fd_dense",
            "fd_compressed", "fd_compressed_vs_dense", "accuracy_dense", "accuracy_compressed",
            "attention_flops_ratio", "method_counts", "time_dense_s", "time_compressed_s", "speedup",
            "calibration_s"}


def test_evaluate_image_adaspa(toy_image_pipe, toy_image_classifier):
    r = evaluate(toy_image_pipe, ditaccel.AdaSpaConfig(sparsity=0.75, block_size=16), n=4, steps=5, batch_size=2,
                 classifier=toy_image_classifier, n_reference=16, return_samples=True)
    assert EXPECTED <= set(r)
    assert 0 < r["attention_flops_ratio"] < 1 and r["method_counts"]["sparse"] > 0
    layers = len(toy_image_pipe.transformer.transformer_blocks)
    assert len(r["recall_per_layer"]) == layers and all(0 < x <= 1 for x in r["recall_per_layer"])
    assert r["recall_min"] == min(r["recall_per_layer"]) <= r["recall_mean"] <= 1
    assert r["samples_dense"].shape == (4, 3, 16, 16) and r["psnr"] > 0 and -1 <= r["ssim"] <= 1
    assert r["fd_dense"] >= 0 and 0 <= r["accuracy_dense"] <= 1
    assert ditaccel.runtime.get_runtime(toy_image_pipe) is None  # removed again
    # same seeds -> the dense half is reproducible
    again = evaluate(toy_image_pipe, None, n=4, steps=5, batch_size=4, return_samples=True)
    assert torch.allclose(again["samples_dense"], r["samples_dense"], atol=1e-5)
    assert "psnr" not in again and "time_compressed_s" not in again


def test_evaluate_image_ditfastattn_calibrates(toy_image_pipe, toy_image_classifier):
    r = evaluate(toy_image_pipe, ditaccel.DiTFastAttnConfig(threshold=0.2), n=2, steps=4, batch_size=2,
                 classifier=toy_image_classifier, n_reference=8)
    assert EXPECTED <= set(r) and r["calibration_s"] > 0 and r["method"] == "DiTFastAttnConfig"
    assert "recall_mean" not in r  # AdaSpa's only


def test_evaluate_video_adaspa():
    tok, te, tr = build_video_components(toy=True, seed=0)
    torch.manual_seed(1)
    for m in tr.modules():  # undo adaLN-Zero so the untrained toy's attention matters
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.2)
    pipe = PixelCogVideoXPipeline(tok, te.eval(), tr.eval(), CogVideoXDDIMScheduler(**VIDEO_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    clf = VideoClassifier(channels=(8, 16), feature_dim=8).eval()
    r = evaluate(pipe, ditaccel.AdaSpaConfig(sparsity=0.5, block_size=16), n=2, steps=5, batch_size=2,
                 classifier=clf, n_reference=8)
    assert EXPECTED <= set(r) and r["kind"] == "video"
    for name in ("dense", "compressed"):
        assert {f"accuracy_{name}_{k}" for k in ("object", "colour", "motion", "background")} <= set(r)
    assert 0 < r["attention_flops_ratio"] < 1


def test_evaluate_rejects_bad_arguments(toy_image_pipe):
    with pytest.raises(ValueError, match="seeds"):
        evaluate(toy_image_pipe, None, n=2, seeds=[1])
    with pytest.raises(ValueError, match="torchmetrics"):
        evaluate(toy_image_pipe, None, n=2, torchmetrics=["bogus"])


# ------------------------------------------------------------------------------ torchmetrics (optional)
class _TinyFeatures(torch.nn.Module):
    """uint8 (N, 3, H, W) -> (N, D): what torchmetrics' FID/IS feed their networks."""

    def __init__(self, d=6):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(12, d)

    def forward(self, x):
        x = x.float() / 255
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # (N, 12)
        return self.proj(pooled)


@pytest.mark.skipif(not HAS_TORCHMETRICS, reason="torchmetrics not installed (optional: pip install ditaccel[eval])")
def test_torchmetrics_paths_with_offline_extractors(toy_image_pipe):
    lpips_like = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731
    r = evaluate(toy_image_pipe, ditaccel.AdaSpaConfig(sparsity=0.75, block_size=16), n=4, steps=5, batch_size=4,
                 n_reference=8, torchmetrics=["fid", "is", "clip", "lpips"],
                 feature_extractors={"fid": _TinyFeatures(), "is": _TinyFeatures(5), "clip": tiny_clip,
                                     "lpips": lpips_like},
                 return_samples=True)
    for k in ("fid_dense", "fid_compressed", "is_dense", "is_compressed", "clip_score_dense",
              "clip_score_compressed", "lpips"):
        assert math.isfinite(r[k]), k
    assert r["fid_dense"] >= 0 and r["is_dense"] >= 1 - 1e-6
    expect = float((r["samples_compressed"] - r["samples_dense"]).abs().flatten(1).mean(1).mean())
    assert r["lpips"] == pytest.approx(expect)
