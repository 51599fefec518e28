"""The quality metrics against independent implementations.

* ``ssim`` against scikit-image's ``structural_similarity`` (Gaussian weights, population
  covariance: the settings its docstring names) and ``frechet_distance`` against the textbook
  formula with ``scipy.linalg.sqrtm``. We keep our own (torch, float64, no scipy at run time) and
  pin them to these references here; torchmetrics' SSIM pads the borders (other numbers) and its
  FID only takes images, so neither replaces ours.
* The optional torchmetrics path (FID / IS / CLIP score / LPIPS, ``pip install ditaccel[eval]``)
  with offline feature extractors, each number against a direct computation on the same inputs.

scikit-image, scipy and torchmetrics are in the test extra, so CI runs all of this.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import tiny_clip

import ditaccel.evaluate as ev
from ditaccel.evaluate import (
    frechet_distance,
    frechet_distance_from_stats,
    inception_splits,
    ssim,
)

skimage_metrics = pytest.importorskip("skimage.metrics")
scipy_linalg = pytest.importorskip("scipy.linalg")
pytest.importorskip("torchmetrics")


# ------------------------------------------------------------------------------ SSIM
@pytest.mark.parametrize("shape", [(1, 11, 11), (3, 16, 16), (3, 23, 17), (1, 40, 12)])
def test_ssim_equals_scikit_image(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.rand(2, *shape, generator=g, dtype=torch.float64)
    b = (a + 0.15 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(a, b, reduction="none")
    ref = [skimage_metrics.structural_similarity(a[i].numpy(), b[i].numpy(), gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False, data_range=1.0, channel_axis=0)
           for i in range(2)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-9)
    # data_range scales the constants: pixels in [0, 255] give the same value
    assert ssim(a * 255, b * 255, data_range=255.0) == pytest.approx(float(np.mean(ref)), abs=1e-9)


# ------------------------------------------------------------------------------ Fréchet distance
def _fd_scipy(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,d", [(40, 5), (200, 16), (12, 30)])  # the last: rank-deficient covariances
def test_frechet_distance_equals_the_scipy_formula(n, d):
    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    y = 0.5 + rng.standard_normal((n + 3, d)) * np.linspace(0.5, 2.0, d)
    expect = _fd_scipy(x, y)
    assert frechet_distance(torch.tensor(x), torch.tensor(y)) == pytest.approx(expect, rel=1e-6, abs=1e-6)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert frechet_distance_from_stats(x.mean(0), s1, y.mean(0), s2) == pytest.approx(expect, rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------------ torchmetrics
class _Features(torch.nn.Module):
    """uint8 (N, 3, H, W) -> (N, D) float64 features, as torchmetrics feeds its networks."""

    def __init__(self, d: int):
        super().__init__()
        g = torch.Generator().manual_seed(d)
        self.register_buffer("w", torch.randn(12, d, generator=g, dtype=torch.float64))

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.double() / 255, 2).flatten(1)  # (N, 12)
        return pooled @ self.w


def _inception_score(logits: torch.Tensor) -> float:
    """One split: exp(mean_x KL(p(y|x) || p(y)))."""
    p = logits.double().softmax(-1)
    marginal = p.mean(0, keepdim=True)
    return float((p * (p.log() - marginal.log())).sum(-1).mean().exp())


def test_inception_splits_keep_at_least_50_samples_per_split():
    assert [inception_splits(n) for n in (1, 4, 49, 50, 99, 100, 499, 500, 5000)] == [1, 1, 1, 1, 1, 2, 9, 10, 10]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_torchmetrics_numbers_equal_direct_computations(kind):
    g = torch.Generator().manual_seed(5)
    shape = (6, 3, 16, 16) if kind == "image" else (3, 3, 2, 16, 16)  # the video: 6 frames of 3 clips
    dense = torch.rand(shape, generator=g)
    compressed = (dense + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    ref = [torch.rand(shape, generator=g) for _ in range(2)]
    texts = ["a red square moving left", "a blue disc", "stripes"] * (2 if kind == "image" else 1)
    fid_net, is_net = _Features(6), _Features(5)

    def lpips_like(a, b):
        return (a - b).abs().flatten(1).mean(1)

    out = ev._torchmetrics(["fid", "is", "clip", "lpips"],
                           {"fid": fid_net, "is": is_net, "clip": tiny_clip, "lpips": lpips_like},
                           kind, dense, compressed, lambda: iter(ref), texts, batch_size=4)
    u8 = lambda x: ev._uint8(ev._as_images(x))  # noqa: E731
    real = fid_net(torch.cat([u8(r) for r in ref]))
    for name, x in (("dense", dense), ("compressed", compressed)):
        assert out[f"fid_{name}"] == pytest.approx(frechet_distance(real, fid_net(u8(x))), rel=1e-4)
        assert out[f"is_{name}"] == pytest.approx(_inception_score(is_net(u8(x))), rel=1e-5)
        assert out[f"is_{name}_std"] is None  # one split of 6 frames: no spread to report
    assert out["fid_compressed"] != pytest.approx(out["fid_dense"])  # the two sets are really scored apart
    # CLIP score: 100 x cosine of the image and caption embeddings, mean over frames, floored at 0
    model, processor = tiny_clip()
    frames = ev._as_images(dense)
    frame_texts = [t for t in texts for _ in range(frames.shape[0] // len(texts))]
    with torch.no_grad():
        enc = processor(text=frame_texts, images=list(u8(dense)), return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=enc["pixel_values"])
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img, txt = (t if torch.is_tensor(t) else t.pooler_output for t in (img, txt))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert out["clip_score_dense"] == pytest.approx(max(float(100 * cos.mean()), 0.0), rel=1e-4, abs=1e-4)
    expect = float(lpips_like(ev._as_images(compressed), ev._as_images(dense)).mean())
    assert out["lpips"] == pytest.approx(expect, rel=1e-6)


def test_torchmetrics_missing_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchmetrics" else real(name, *a))
    with pytest.raises(ImportError, match=r"ditaccel\[eval\]"):
        ev._require_torchmetrics()
