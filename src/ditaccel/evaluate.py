"""Quality evaluation of an attention method against dense generation with the same seeds.

``evaluate(pipe, method, n=..., steps=...)`` generates ``n`` samples twice with the same seeds and
inputs, dense and with ``method`` applied through the public API (``ditaccel.apply`` /
``ditaccel.stats`` / ``ditaccel.remove``), and reports:

* ``psnr`` / ``ssim``: compressed vs. the dense sample of the same seed (mean over samples).
* ``fd_dense`` / ``fd_compressed`` / ``fd_compressed_vs_dense``: Fréchet distances on the features
  of a classifier trained on the procedural data (``ditaccel.testbed.classifier``), generated vs.
  procedural reference data with the same conditioning distribution, and compressed vs. dense.
* ``accuracy_dense`` / ``accuracy_compressed``: that classifier's accuracy on the samples (image:
  the class; video: object and motion both right, per-factor accuracies alongside).
* ``attention_flops_ratio``, ``method_counts``, times (``time_dense_s``, ``time_compressed_s``,
  ``speedup``, ``calibration_s``).
* optionally FID / IS / CLIP score / LPIPS through torchmetrics (``pip install ditaccel[eval]``;
  the default feature extractors download weights, or pass your own).

``evaluate`` reads as its steps, each a small function below it: prepare the call (``_prepare``),
the dense set, the plan (calibrated here from a ``DiTFastAttnConfig``), the compressed set with
its attention statistics, then the pairwise, classifier and torchmetrics scores.

The metric functions (``psnr``, ``ssim``, ``frechet_distance``, ...) work on any tensors and are
usable alone. Samples are pixels in ``[0, 1]``: images ``(N, C, H, W)``, videos ``(N, C, F, H, W)``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import ditaccel

from .cli_support import call_params
from .testbed.classifier import ImageClassifier, VideoClassifier
from .testbed.data import ImageClasses, VideoCaptions
from .testbed.pixel import WEIGHTS_DIR, load_image_pipeline, load_video_pipeline

__all__ = [
    "classifier_accuracy",
    "classifier_features",
    "evaluate",
    "evaluate_trained",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_window",
    "load_trained",
    "psnr",
    "ssim",
]

TORCHMETRICS_METRICS = ("fid", "is", "clip", "lpips")


# ============================================================================ pixel metrics
def _per_sample(x: torch.Tensor, reduction: str):
    if reduction == "none":
        return x
    if reduction == "mean":
        return float(x.mean())
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_pair(a: torch.Tensor, b: torch.Tensor):
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"expected a batch (N, ...), got shape {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, reduction: str = "mean"):
    """Peak signal-to-noise ratio (dB) per sample: ``10 log10(data_range² / MSE)`` with the MSE over
    all non-batch dims; identical samples give ``inf``. ``reduction="mean"``: the mean over samples
    (a float), ``"none"``: the (N,) tensor."""
    _check_pair(a, b)
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range**2 / mse)  # mse = 0 -> inf
    return _per_sample(out, reduction)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    """Normalised 1D Gaussian of ``size`` taps centred on the middle tap."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
):
    """Structural similarity (Wang et al. 2004) with a Gaussian window, per sample.

    Standard constants: 11x11 Gaussian window, sigma 1.5, ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``,
    population (co)variances, the SSIM map over the *valid* window positions (no padding: the
    same numbers as ``skimage.metrics.structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=L)``), averaged over channels and positions. Images
    smaller than the window use the largest odd window that fits. Videos ``(N, C, F, H, W)``: the
    mean over frames. Returns the mean over samples (a float) or the (N,) tensor
    (``reduction="none"``).
    """
    _check_pair(a, b)
    if a.ndim == 5:  # (N, C, F, H, W) -> frames as images, then the mean per sample
        n, c, f = a.shape[:3]
        fa = a.transpose(1, 2).reshape(n * f, c, *a.shape[-2:])
        fb = b.transpose(1, 2).reshape(n * f, c, *b.shape[-2:])
        per = ssim(fa, fb, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2, reduction="none")
        return _per_sample(per.view(n, f).mean(1), reduction)
    if a.ndim != 4:
        raise ValueError(f"ssim expects (N, C, H, W) or (N, C, F, H, W), got shape {tuple(a.shape)}")
    h, w = a.shape[-2:]
    win = min(win_size, h, w)
    win -= 1 - win % 2  # odd
    g = gaussian_window(win, sigma).to(a.device)
    c = a.shape[1]
    gx = g.view(1, 1, 1, -1).expand(c, 1, 1, win)
    gy = g.view(1, 1, -1, 1).expand(c, 1, win, 1)

    def filt(x):
        return F.conv2d(F.conv2d(x, gx, groups=c), gy, groups=c)

    x, y = a.double(), b.double()
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return _per_sample(smap.flatten(1).mean(1), reduction)


# ============================================================================ Fréchet distance
def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """``||mu1 - mu2||² + tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½)``: the Fréchet (2-Wasserstein²)
    distance of two Gaussians. Square roots by symmetric eigendecomposition in float64 (negative
    eigenvalues from round-off clamped to 0); no scipy."""
    mu1, mu2 = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(v, dtype=torch.float64) for v in (cov1, cov2))
    if cov1.ndim == 0:
        cov1, cov2 = cov1.view(1, 1), cov2.view(1, 1)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"inconsistent shapes: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"cov {tuple(cov1.shape)}/{tuple(cov2.shape)}")
    s1 = _psd_sqrt((cov1 + cov1.T) / 2)
    m = s1 @ cov2 @ s1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_covmean
    return max(float(d), 0.0)  # >= 0 in exact arithmetic; round-off can dip below


def _stats(feats: torch.Tensor):
    x = torch.as_tensor(feats, dtype=torch.float64).reshape(len(feats), -1)
    if x.shape[0] < 2:
        raise ValueError("frechet_distance needs at least 2 samples per set")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)``
    (sample means, unbiased covariances), as in FID."""
    return frechet_distance_from_stats(*_stats(feats_a), *_stats(feats_b))


# ============================================================================ classifier metrics
@torch.no_grad()
def classifier_features(classifier, samples: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """``classifier.features`` of samples in [0, 1] (mapped to the classifier's [-1, 1]), float64 CPU."""
    dev = next(classifier.parameters()).device
    out = [classifier.features(samples[i:i + batch_size].to(dev) * 2 - 1).double().cpu()
           for i in range(0, len(samples), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def classifier_accuracy(classifier, samples: torch.Tensor, labels, *, batch_size: int = 64):
    """Accuracy of ``classifier`` on samples in [0, 1].

    Image classifier: ``labels`` (N,) class ids -> a float. Video classifier: ``labels`` a dict of
    (N,) tensors per factor -> ``{factor: accuracy}`` plus ``"object+motion"`` (both right).
    """
    dev = next(classifier.parameters()).device
    preds = []
    for i in range(0, len(samples), batch_size):
        out = classifier(samples[i:i + batch_size].to(dev) * 2 - 1)
        preds.append({k: v.argmax(-1).cpu() for k, v in out.items()} if isinstance(out, dict) else out.argmax(-1).cpu())
    if not isinstance(preds[0], dict):
        return float((torch.cat(preds) == torch.as_tensor(labels).cpu()).double().mean())
    acc, hit = {}, {}
    for k in preds[0]:
        hit[k] = torch.cat([p[k] for p in preds]) == torch.as_tensor(labels[k]).cpu()
        acc[k] = float(hit[k].double().mean())
    if "object" in hit and "motion" in hit:
        acc["object+motion"] = float((hit["object"] & hit["motion"]).double().mean())
    return acc


# ============================================================================ generation helpers
def pipe_kind(pipe) -> str:
    params = call_params(pipe)
    if "class_labels" in params:
        return "image"
    if "prompt" in params:
        return "video" if "num_frames" in params else "text-image"
    raise TypeError(f"evaluate: cannot tell how to condition {type(pipe).__name__} (no class_labels/prompt argument)")


def _sync(pipe):
    dev = getattr(pipe, "_execution_device", None)
    if dev is not None and torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


def _to_samples(out, kind: str) -> torch.Tensor:
    if kind == "video":
        frames = out.frames
        if not torch.is_tensor(frames):
            frames = torch.as_tensor(frames)
        return frames.float().cpu().permute(0, 2, 1, 3, 4).contiguous()  # (B, F, C, H, W) -> (B, C, F, H, W)
    images = out.images
    if not torch.is_tensor(images):
        images = torch.as_tensor(images).permute(0, 3, 1, 2)
    return images.float().cpu().contiguous()


def default_inputs(pipe, kind: str, n: int, seed: int):
    if kind == "image":
        k = pipe.transformer.config.num_embeds_ada_norm
        k = k if k is not None and k < 1000 else len(getattr(pipe, "labels", {}) or range(8))
        return [i % k for i in range(n)]
    return VideoCaptions.captions(VideoCaptions().balanced_labels(n, seed))


def generate_samples(pipe, kind, inputs, seeds, steps, batch_size, call_kwargs, on_batch=None, progress=None,
              desc: str = "generate"):
    """Samples of ``seeds`` in batches, and the seconds the pipeline calls took. ``progress``: a
    ``tqdm``-like factory for a bar counting samples (the caller's; None: quiet)."""
    key = "class_labels" if kind == "image" else "prompt"
    samples, seconds = [], 0.0
    bar = progress(total=len(seeds), desc=desc, unit="sample") if progress is not None else None
    for s in range(0, len(seeds), batch_size):
        gens = [torch.Generator().manual_seed(int(x)) for x in seeds[s:s + batch_size]]
        kw = dict(call_kwargs, **{key: list(inputs[s:s + batch_size])}, generator=gens, num_inference_steps=steps,
                  output_type="pt")
        _sync(pipe)
        t0 = time.perf_counter()
        out = pipe(**kw)
        _sync(pipe)
        seconds += time.perf_counter() - t0
        samples.append(_to_samples(out, kind))
        if on_batch is not None:
            on_batch()
        if bar is not None:
            bar.update(len(gens))
    if bar is not None:
        bar.close()
    return torch.cat(samples), seconds


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as is; videos (N, C, F, H, W) -> their frames (N*F, C, H, W)."""
    return x if x.ndim == 4 else x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[-2:])


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def reference_batches(kind, samples, labels, n_ref, seed, batch_size):
    """Procedural data with the conditioning distribution of the generated set (labels cycled),
    in [0, 1], ``batch_size`` at a time from one generator (deterministic, bounded memory)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n_ref) % len(samples)
    data = (ImageClasses(size=samples.shape[-1]) if kind == "image"
            else VideoCaptions(frames=samples.shape[2], size=samples.shape[-1]))
    for s in range(0, n_ref, batch_size):
        i = idx[s:s + batch_size]
        if kind == "image":
            x, _ = data.sample(len(i), g, labels=torch.as_tensor(labels)[i])
        else:
            x, _, _ = data.sample(len(i), g, labels={k: torch.as_tensor(v)[i] for k, v in labels.items()})
        yield (x + 1) / 2


# ============================================================================ torchmetrics
def inception_splits(n: int) -> int:
    """Inception Score splits for ``n`` samples: the customary 10, but at least 50 samples per
    split and at least one split. A split of one sample scores exactly 1 whatever the images (its
    marginal is its own prediction), which ``min(10, n)`` gave for n <= 10."""
    return max(1, min(10, n // 50))


def _require_torchmetrics():
    if importlib.util.find_spec("torchmetrics") is None:
        raise ImportError("torchmetrics is not installed: FID/IS/CLIP/LPIPS need `pip install ditaccel[eval]` "
                          "(torchmetrics >= 1.4; the default feature extractors also need torch-fidelity or "
                          "torchvision and download their weights)")


class _TensorFeatures(torch.nn.Module):
    """A CLIP model whose ``get_{image,text}_features`` return tensors: transformers 5 returns a
    ``BaseModelOutputWithPooling`` (projected embedding in ``pooler_output``), torchmetrics'
    ``CLIPScore`` expects the tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _clip_loader(spec):
    """torchmetrics ``CLIPScore(model_name_or_path=...)`` argument from a model id/path or a
    callable returning ``(model, processor)``; the model wrapped by ``_TensorFeatures``."""
    def load():
        if callable(spec):
            model, processor = spec()
        else:
            from transformers import CLIPModel, CLIPProcessor

            model, processor = CLIPModel.from_pretrained(spec), CLIPProcessor.from_pretrained(spec)
        return _TensorFeatures(model.eval()), processor

    return load


def _torchmetrics(names, extractors, kind, dense, compressed, reference, texts, batch_size):
    """FID/IS/CLIP/LPIPS on frames; custom extractors get uint8 (N, 3, H, W) like the defaults."""
    _require_torchmetrics()
    out = {}
    ext = dict(extractors or {})
    d_img, c_img = _as_images(dense), _as_images(compressed)
    frames = 1 if dense.ndim == 4 else dense.shape[2]

    def batches(x):
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size]

    if "fid" in names:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=ext.get("fid", 2048), reset_real_features=False,
                                       input_img_size=tuple(d_img.shape[1:]))
        for chunk in reference():
            for b in batches(_as_images(chunk)):
                fid.update(_uint8(b), real=True)
        for name, x in (("dense", d_img), ("compressed", c_img)):
            fid.reset()
            for b in batches(x):
                fid.update(_uint8(b), real=False)
            out[f"fid_{name}"] = float(fid.compute())
    if "is" in names:
        from torchmetrics.image.inception import InceptionScore

        for name, x in (("dense", d_img), ("compressed", c_img)):
            metric = InceptionScore(feature=ext.get("is", "logits_unbiased"), splits=inception_splits(len(x)))
            for b in batches(x):
                metric.update(_uint8(b))
            mean, std = metric.compute()  # std over splits: none with one split
            out[f"is_{name}"], out[f"is_{name}_std"] = float(mean), float(std) if metric.splits > 1 else None
    if "clip" in names:
        from torchmetrics.multimodal.clip_score import CLIPScore

        metric = CLIPScore(model_name_or_path=_clip_loader(ext.get("clip", "openai/clip-vit-base-patch16")))
        frame_texts = [t for t in texts for _ in range(frames)]
        for name, x in (("dense", d_img), ("compressed", c_img)):
            metric.reset()
            for i in range(0, len(x), batch_size):
                metric.update(list(_uint8(x[i:i + batch_size])), frame_texts[i:i + batch_size])
            out[f"clip_score_{name}"] = float(metric.compute())
    if "lpips" in names:
        net = ext.get("lpips")
        if net is None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            net = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
        vals = []
        for i in range(0, len(c_img), batch_size):
            a, b = c_img[i:i + batch_size], d_img[i:i + batch_size]
            if hasattr(net, "update") and hasattr(net, "compute"):  # a torchmetrics metric
                net.update(a, b)
            else:  # a module/callable returning per-pair distances
                vals.append(torch.as_tensor(net(a, b)).flatten().double())
        out["lpips"] = float(net.compute()) if not vals else float(torch.cat(vals).mean())
    return out


# ============================================================================ evaluate
def evaluate(
    pipe,
    method=None,
    *,
    n: int = 16,
    seeds: Sequence[int] | None = None,
    steps: int = 20,
    inputs: Sequence | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    classifier=None,
    n_reference: int = 512,
    reference_seed: int = 1_000_003,
    calibration_inputs: Sequence | None = None,
    calibration_seed: int = 10_007,
    torchmetrics: Sequence[str] = (),
    feature_extractors: dict | None = None,
    warmup: bool = False,
    call_kwargs: dict | None = None,
    return_samples: bool = False,
    dense: dict | None = None,
    progress=None,
) -> dict:
    """Generate ``n`` samples dense and with ``method`` (same seeds, same inputs) and compare.

    Args:
        pipe: a diffusers pipeline (class-conditional: ``class_labels``; text-to-video: ``prompt``
            and ``num_frames``), or a zero-argument callable returning one.
        method: what to compare against dense: a DiTFastAttn ``Plan`` or plan file path, an
            ``AdaSpaConfig``, or a ``DiTFastAttnConfig`` (then a plan is calibrated here with
            ``steps`` on ``calibration_inputs``, default 8 inputs, generator ``calibration_seed``).
            ``None``: dense only (the ``*_compressed`` keys and the pairwise metrics are omitted).
        n: number of samples; ``seeds``: one seed per sample (default ``0 .. n-1``); sample ``i``
            starts from the noise of ``torch.Generator().manual_seed(seeds[i])``.
        steps: ``num_inference_steps``.
        inputs: one class label / prompt per sample. Default: classes ``i % num_classes`` for a
            class-conditional pipeline, balanced ``VideoCaptions`` captions for video.
        guidance_scale: passed to the pipeline when given (else the pipeline's default).
        batch_size: samples per pipeline call.
        classifier: an ``ImageClassifier`` / ``VideoClassifier`` (``ditaccel.testbed.classifier``):
            enables the Fréchet distances and the accuracies. Video labels come from the prompts
            (``VideoCaptions.parse``).
        n_reference: procedural reference samples for the Fréchet distances (conditioning cycled
            from ``inputs``), drawn with ``reference_seed``.
        torchmetrics: any of ``"fid"``, ``"is"``, ``"clip"``, ``"lpips"`` (needs torchmetrics).
        feature_extractors: per torchmetrics metric, instead of its default (downloaded) network:
            ``"fid"``: an ``nn.Module`` mapping uint8 ``(N, 3, H, W)`` to ``(N, D)`` features;
            ``"is"``: an ``nn.Module`` mapping uint8 images to ``(N, K)`` logits; ``"clip"``: a model
            id or a callable returning ``(model, processor)`` (torchmetrics' ``CLIPScore``
            contract); ``"lpips"``: a torchmetrics metric or a callable ``(a, b) -> (N,)``
            distances on [0, 1] images. Videos are scored frame by frame.
        warmup: run the first batch once, untimed, before timing dense and compressed (GPU
            autotuning, lazy initialisation).
        call_kwargs: extra pipeline arguments (``num_frames``, ``height``, ...).
        return_samples: also return ``samples_dense`` / ``samples_compressed`` (CPU tensors in [0, 1]);
            with a classifier also ``features_dense`` / ``features_reference`` (its float64 features of
            the dense and the procedural reference sets).
        dense: the result of an earlier ``evaluate(..., return_samples=True)`` of this pipeline with the
            same ``n``, ``seeds``, ``steps``, inputs and call settings: its dense samples, dense time
            and (when it has them) classifier features are reused instead of generating and scoring
            the dense set again (a table of methods against one dense set). ``n``, ``seeds``,
            ``steps`` and the reference size are checked; the inputs, the call settings and the
            classifier are the caller's to keep the same.
        progress: a ``tqdm``-like factory (``progress(total=..., desc=..., unit=...)`` returning an
            object with ``update``/``close``) for one bar per generated set, counting samples;
            ``None`` (the default): no bars. Calibration has its own (``DiTFastAttnConfig.show_progress``).

    Returns:
        A dict: ``kind``, ``method``, ``n``, ``steps``, ``seeds``; ``psnr``, ``psnr_min``,
        ``ssim``, ``ssim_min`` (compressed vs dense); with a classifier ``fd_dense``,
        ``fd_compressed``, ``fd_compressed_vs_dense``, ``accuracy_dense``, ``accuracy_compressed``
        (video: object and motion both right; ``accuracy_{dense,compressed}_{factor}`` per factor);
        ``attention_flops_ratio``, ``method_counts``, AdaSpa's ``recall_per_layer`` (attention mass kept
        by its masks, mean over searches, heads and batches) with ``recall_min`` / ``recall_mean``,
        ``time_dense_s``, ``time_compressed_s``,
        ``speedup``, ``calibration_s``; torchmetrics keys when requested (``fid_dense``,
        ``fid_compressed``, ``is_dense``, ``is_compressed``, ``clip_score_dense``,
        ``clip_score_compressed``, ``lpips``).
    """
    gen = _prepare(pipe, n=n, seeds=seeds, steps=steps, inputs=inputs, guidance_scale=guidance_scale,
                   batch_size=batch_size, torchmetrics=torchmetrics, warmup=warmup, call_kwargs=call_kwargs,
                   progress=progress)
    result: dict = {"kind": gen.kind, "method": _method_name(method), "n": n, "steps": steps, "seeds": gen.seeds}
    reused = _check_reused_dense(dense, gen.kind, n, gen.seeds, steps, n_reference) if dense is not None else {}
    dense, result["time_dense_s"] = _dense_set(gen, reused)
    compressed = None
    if method is not None:
        plan, result["calibration_s"] = _plan_for(gen, method, calibration_inputs, calibration_seed)
        compressed, measured = _compressed_set(gen, plan, desc=_method_name(method) or "compressed")
        t_comp = measured.pop("time_compressed_s")
        result.update(time_compressed_s=t_comp, speedup=result["time_dense_s"] / t_comp if t_comp > 0 else math.nan,
                      **measured)
        result.update(_pairwise_metrics(compressed, dense))
    labels = _labels(gen.kind, gen.inputs) if classifier is not None or "fid" in torchmetrics else None
    if classifier is not None:
        result.update(_classifier_metrics(classifier, gen, dense, compressed, labels, reused, n_reference,
                                          reference_seed, return_features=return_samples))
    if torchmetrics:
        result.update(_torchmetrics_metrics(gen, torchmetrics, feature_extractors, dense, compressed, labels,
                                            n_reference, reference_seed))
    if return_samples:
        result["samples_dense"] = dense
        if compressed is not None:
            result["samples_compressed"] = compressed
    return result


# The steps of ``evaluate``, in the order it takes them.
@dataclass
class _Generation:
    """How every set of one ``evaluate`` call is generated: the pipeline, its kind (``"image"`` or
    ``"video"``), one input and one seed per sample, and the call settings."""

    pipe: Any
    kind: str
    inputs: list
    seeds: list[int]
    steps: int
    batch_size: int
    call_kwargs: dict
    warmup: bool
    progress: Any

    @property
    def input_key(self) -> str:
        """The pipeline argument the inputs go to."""
        return "class_labels" if self.kind == "image" else "prompt"

    def generate(self, desc: str, on_batch=None):
        """(samples, seconds) of every seed; with ``warmup``, the first batch once, untimed, before."""
        if self.warmup:
            generate_samples(self.pipe, self.kind, self.inputs[:self.batch_size], self.seeds[:self.batch_size], self.steps,
                      self.batch_size, self.call_kwargs)
        return generate_samples(self.pipe, self.kind, self.inputs, self.seeds, self.steps, self.batch_size, self.call_kwargs,
                         on_batch, progress=self.progress, desc=desc)


def _prepare(pipe, *, n, seeds, steps, inputs, guidance_scale, batch_size, torchmetrics, warmup, call_kwargs,
             progress) -> _Generation:
    """Step 1: check the arguments and settle the defaults (the pipeline built if a factory was
    passed, seeds ``0 .. n-1``, default inputs, ``guidance_scale`` into the call settings)."""
    if not hasattr(pipe, "transformer") and callable(pipe):
        pipe = pipe()
    kind = pipe_kind(pipe)
    if kind == "text-image":
        raise ValueError("evaluate: text-to-image pipelines are not supported yet (class-conditional images and "
                         "text-to-video are)")
    unknown = set(torchmetrics) - set(TORCHMETRICS_METRICS)
    if unknown:
        raise ValueError(f"torchmetrics: unknown metrics {sorted(unknown)}; choose from {TORCHMETRICS_METRICS}")
    if torchmetrics:
        _require_torchmetrics()
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"seeds: expected {n} seeds, got {len(seeds)}")
    inputs = list(default_inputs(pipe, kind, n, 0) if inputs is None else inputs)
    if len(inputs) != n:
        raise ValueError(f"inputs: expected {n} class labels / prompts, got {len(inputs)}")
    call_kwargs = dict(call_kwargs or {})
    if guidance_scale is not None:
        call_kwargs["guidance_scale"] = guidance_scale
    return _Generation(pipe, kind, inputs, seeds, steps, batch_size, call_kwargs, warmup, progress)


def _dense_set(gen: _Generation, reused: dict):
    """Step 2: the dense samples and their seconds, generated or taken from an earlier result."""
    if reused:
        return reused["samples_dense"], reused["time_dense_s"]
    return gen.generate("dense")


def _plan_for(gen: _Generation, method, calibration_inputs, calibration_seed: int):
    """Step 3: what ``ditaccel.apply`` takes, and the seconds it took to make: a
    ``DiTFastAttnConfig`` is calibrated into a plan here, anything else is passed on as it is."""
    if not isinstance(method, ditaccel.DiTFastAttnConfig):
        return method, 0.0
    cal = list(calibration_inputs) if calibration_inputs is not None else default_inputs(gen.pipe, gen.kind, 8, 1)
    t0 = time.perf_counter()
    plan = ditaccel.calibrate(gen.pipe, method, num_inference_steps=gen.steps, **{gen.input_key: cal},
                              generator=torch.Generator().manual_seed(calibration_seed), **gen.call_kwargs)
    return plan, time.perf_counter() - t0


class _StatsTotals:
    """``ditaccel.stats`` summed over the generations of a set (called after each batch)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.flops_done = self.flops_dense = 0.0
        self.counts: Counter = Counter()
        self.recalls: dict[int, list[float]] = {}  # AdaSpa: per layer, the kept attention mass of each search

    def __call__(self):
        st = ditaccel.stats(self.pipe)
        self.flops_dense += st.attention_tflops_dense
        self.flops_done += st.attention_flops_ratio * st.attention_tflops_dense
        self.counts.update(st.method_counts)
        for layer, values in enumerate(st.details.get("recall_per_search") or []):
            self.recalls.setdefault(layer, []).extend(values)

    def result(self) -> dict:
        """``attention_flops_ratio``, ``method_counts`` and, for AdaSpa, the recall per layer."""
        ratio = self.flops_done / self.flops_dense if self.flops_dense > 0 else math.nan
        out = {"attention_flops_ratio": ratio, "method_counts": dict(self.counts)}
        if self.recalls:
            per_layer = [sum(v) / len(v) for _, v in sorted(self.recalls.items()) if v]
            out.update(recall_per_layer=per_layer, recall_min=min(per_layer),
                       recall_mean=sum(per_layer) / len(per_layer))
        return out


def _compressed_set(gen: _Generation, plan, desc: str):
    """Step 4: the samples with ``plan`` applied (removed again whatever happens), and what was
    measured: ``time_compressed_s`` and the totals of ``_StatsTotals``."""
    totals = _StatsTotals(gen.pipe)
    ditaccel.apply(gen.pipe, plan)
    try:
        compressed, seconds = gen.generate(desc, totals)
    finally:
        ditaccel.remove(gen.pipe)
    return compressed, {"time_compressed_s": seconds, **totals.result()}


def _pairwise_metrics(compressed: torch.Tensor, dense: torch.Tensor) -> dict:
    """Step 5: PSNR and SSIM of each compressed sample against the dense one of its seed (mean, min)."""
    per_psnr = psnr(compressed, dense, reduction="none")
    per_ssim = ssim(compressed, dense, reduction="none")
    return {"psnr": float(per_psnr.mean()), "psnr_min": float(per_psnr.min()),
            "ssim": float(per_ssim.mean()), "ssim_min": float(per_ssim.min())}


def _labels(kind: str, inputs: list):
    """The conditioning as labels: image class ids (N,), or per video factor (N,) from the captions."""
    if kind == "image":
        return torch.as_tensor([int(x) for x in inputs])
    parsed = [VideoCaptions.parse(p) for p in inputs]
    return {k: torch.as_tensor([p[k] for p in parsed]) for k in VideoCaptions.FACTORS}


def _classifier_metrics(classifier, gen: _Generation, dense, compressed, labels, reused: dict, n_reference: int,
                        reference_seed: int, *, return_features: bool) -> dict:
    """Step 6: the classifier's Fréchet distances (to procedural reference data, and compressed to
    dense) and accuracies; its dense and reference features reused from ``reused`` when it has them."""
    classifier.eval()
    bs = gen.batch_size
    out: dict = {}
    if "features_reference" in reused:
        f_ref, f_dense = reused["features_reference"], reused["features_dense"]
    else:
        f_ref = torch.cat([classifier_features(classifier, chunk, batch_size=bs)
                           for chunk in reference_batches(gen.kind, dense, labels, n_reference, reference_seed, bs)])
        f_dense = classifier_features(classifier, dense, batch_size=bs)
    if return_features:
        out.update(features_dense=f_dense, features_reference=f_ref)
    out["fd_dense"] = frechet_distance(f_dense, f_ref)
    sets = [("dense", dense)]
    if compressed is not None:
        f_comp = classifier_features(classifier, compressed, batch_size=bs)
        out["fd_compressed"] = frechet_distance(f_comp, f_ref)
        out["fd_compressed_vs_dense"] = frechet_distance(f_comp, f_dense)
        sets.append(("compressed", compressed))
    for name, x in sets:
        acc = classifier_accuracy(classifier, x, labels, batch_size=bs)
        if isinstance(acc, dict):
            out[f"accuracy_{name}"] = acc["object+motion"]
            for k, v in acc.items():
                if k != "object+motion":
                    out[f"accuracy_{name}_{k}"] = v
        else:
            out[f"accuracy_{name}"] = acc
    return out


def _torchmetrics_metrics(gen: _Generation, names, feature_extractors, dense, compressed, labels, n_reference: int,
                          reference_seed: int) -> dict:
    """Step 7: the requested torchmetrics metrics of the dense and the compressed set (both needed)."""
    if compressed is None:
        raise ValueError("torchmetrics: needs a method (they compare dense and compressed sets)")

    def reference():
        return reference_batches(gen.kind, dense, labels, n_reference, reference_seed, gen.batch_size)

    if gen.kind == "image":
        names_of = getattr(gen.pipe, "labels", None) or {}
        id2name = {v: k for k, v in names_of.items()}
        texts = [f"a {id2name.get(int(x), str(x))}" for x in gen.inputs]
    else:
        texts = list(gen.inputs)
    return _torchmetrics(names, feature_extractors, gen.kind, dense, compressed, reference, texts, gen.batch_size)


def _check_reused_dense(dense, kind: str, n: int, seeds: list[int], steps: int, n_reference: int) -> dict:
    """``dense`` (an earlier result) if it can stand for this call's dense set, else a ``ValueError``."""
    if not isinstance(dense, dict) or "samples_dense" not in dense:
        raise ValueError("dense: expected the result of an earlier evaluate(..., return_samples=True)")
    for key, value in (("kind", kind), ("n", n), ("seeds", seeds), ("steps", steps)):
        if dense.get(key) != value:
            raise ValueError(f"dense: made with {key}={dense.get(key)!r}, this call has {key}={value!r}")
    if "features_reference" in dense and len(dense["features_reference"]) != n_reference:
        raise ValueError(f"dense: its reference features hold {len(dense['features_reference'])} samples, this "
                         f"call has n_reference={n_reference}")
    return dense


def _method_name(method) -> str | None:
    if method is None:
        return None
    if isinstance(method, (str, os.PathLike)):
        return f"plan:{os.fspath(method)}"
    return type(method).__name__


def load_trained(which: str = "image", *, weights_dir=None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """The trained testbed pipeline ``which`` (``"image"`` or ``"video"``) and its classifier (float32,
    eval mode), from ``weights_dir`` (the folder holding ``image/``, ``video/``,
    ``image_classifier/``, ``video_classifier/``; default: the shipped weights)."""
    from pathlib import Path

    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if which == "image":
        pipe = load_image_pipeline(root / "image", dtype=dtype, device=device)
        clf = ImageClassifier.from_pretrained(str(root / "image_classifier"))
    elif which == "video":
        pipe = load_video_pipeline(root / "video", dtype=dtype, device=device)
        clf = VideoClassifier.from_pretrained(str(root / "video_classifier"))
    else:
        raise ValueError(f"which must be 'image' or 'video', got {which!r}")
    return pipe, torch.nn.Module.to(clf, device=device, dtype=torch.float32).eval()


def evaluate_trained(which: str = "image", method=None, *, weights_dir=None, device: str = "cpu",
                     dtype: torch.dtype = torch.float32, **kwargs) -> dict:
    """``evaluate`` on a trained testbed model with its shipped classifier (``load_trained``).

    ``which``: ``"image"`` or ``"video"``; ``weights_dir``: the folder holding ``image/``,
    ``video/``, ``image_classifier/``, ``video_classifier/`` (default: the shipped weights).
    Other keyword arguments go to ``evaluate``.
    """
    pipe, clf = load_trained(which, weights_dir=weights_dir, device=device, dtype=dtype)
    return evaluate(pipe, method, classifier=clf, **kwargs)

