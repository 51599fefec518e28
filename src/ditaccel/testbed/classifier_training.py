"""Training the image and video classifiers on fresh procedural data, with noise and blur
augmentation (robustness to generation artefacts), and their held-out accuracy: the classifiers
that give ``ditaccel.evaluate`` its accuracies and Fréchet features (``train_classifiers``, saved
to ``out_dir/image_classifier`` and ``out_dir/video_classifier``). Recipe:
``recipes.CLASSIFIER_RECIPE``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import to_float16, write_info
from .classifier import ImageClassifier, VideoClassifier
from .data import ImageClasses, VideoCaptions, make_generator
from .recipes import CLASSIFIER_RECIPE
from .training import Budget, StepPlan, autocast, lr_at, resolve_device, seeded, sync, train_loop

__all__ = ["train_classifiers"]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Robustness to generation artefacts: Gaussian noise (sigma up to 0.2) and a mild blur, each
    on a random half of the batch."""
    n = x.shape[0]
    shape = (n,) + (1,) * (x.ndim - 1)
    u = torch.rand((2,) + shape, generator=g, device=x.device)
    sigma = 0.2 * u[0] * (u[1] < 0.5)
    x = x + sigma * torch.randn(x.shape, generator=g, device=x.device)
    flat = x
    if x.ndim == 5:  # blur frames as images
        flat = x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[-2:])
    blurred = F.avg_pool2d(flat, 3, stride=1, padding=1, count_include_pad=False)
    if x.ndim == 5:
        blurred = blurred.reshape(x.shape[0], x.shape[2], x.shape[1], *x.shape[-2:]).transpose(1, 2)
    mix = 0.7 * (torch.rand(shape, generator=g, device=x.device) < 0.3)
    return (1 - mix) * x + mix * blurred


@torch.no_grad()
def _accuracy_image(clf, data, n, seed, dev, bs=256):
    g, correct = make_generator(seed), 0
    for s in range(0, n, bs):
        x, y = data.sample(min(bs, n - s), g, device=dev)
        with autocast(dev):
            correct += (clf(x).argmax(-1).cpu() == y).sum().item()
    return correct / n


@torch.no_grad()
def _accuracy_video(clf, data, n, seed, dev, bs=64):
    g = make_generator(seed)
    correct = {k: 0 for k in VideoCaptions.FACTORS}
    for s in range(0, n, bs):
        x, _, lab = data.sample(min(bs, n - s), g, device=dev)
        with autocast(dev):
            out = clf(x)
        for k in correct:
            correct[k] += (out[k].argmax(-1).cpu() == lab[k]).sum().item()
    return {k: v / n for k, v in correct.items()}


def train_classifiers(
    out_dir: str | os.PathLike,
    *,
    minutes: float = 4.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    toy: bool = False,
    which: tuple[str, ...] = ("image", "video"),
    steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Train the image and/or video classifier and save them to ``out_dir/image_classifier`` and
    ``out_dir/video_classifier`` (fp16 safetensors + ``config.json``).

    Args:
        out_dir: parent folder (the shipped layout: ``ditaccel/testbed/weights``).
        minutes: budget for both together (image gets a third, video two thirds).
        seed: fixes initialisation, data and augmentation streams.
        device, toy, progress: as ``train_image``.
        which: any of ``"image"``, ``"video"``.
        steps: override the step count of each (``CLASSIFIER_RECIPE``).

    Returns:
        ``{"image": info, "video": info}``; each info has the held-out accuracy on fresh
        procedural data (``eval_accuracy``), also written to ``train_info.json``.
    """
    out_dir, dev = Path(out_dir), resolve_device(device)
    r = dict(CLASSIFIER_RECIPE)
    if toy:
        r.update(image_steps=3, image_batch_size=8, video_steps=3, video_batch_size=4, eval_samples=16)
    unknown = set(which) - {"image", "video"}
    if unknown:
        raise ValueError(f"which: unknown {sorted(unknown)}; use 'image' and/or 'video'")
    results = {}
    share = {"image": 1 / 3, "video": 2 / 3} if len(which) == 2 else {which[0]: 1.0} if which else {}
    for kind in which:
        budget = Budget(minutes * share[kind])
        n_steps = steps or r[f"{kind}_steps"]
        bs = r[f"{kind}_batch_size"]
        if kind == "image":
            data = ImageClasses(size=16 if toy else 64)
            clf = seeded(seed, lambda: ImageClassifier(channels=(8, 16) if toy else (32, 64, 96, 128),
                                                        feature_dim=16 if toy else 128))
        else:
            data = VideoCaptions(frames=4, size=16) if toy else VideoCaptions()
            clf = seeded(seed, lambda: VideoClassifier(channels=(8, 16) if toy else (24, 48, 96, 128),
                                                        feature_dim=16 if toy else 128))
        clf.to(dev).train()
        opt = torch.optim.AdamW(clf.parameters(), lr=r["lr"], weight_decay=0.01)
        data_gen, aug_gen = make_generator(seed + 1), torch.Generator(device=dev).manual_seed(seed + 2)

        def step_fn(i, kind=kind, clf=clf, opt=opt, data=data, bs=bs, n_steps=n_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(i, n_steps, max(1, n_steps // 20), r["lr"])
            if kind == "image":
                x, y = data.sample(bs, data_gen, device=dev)
                with autocast(dev):
                    loss = F.cross_entropy(clf(_augment(x, aug_gen)).float(), y.to(dev))
            else:
                x, _, lab = data.sample(bs, data_gen, device=dev)
                with autocast(dev):
                    out = clf(_augment(x, aug_gen))
                loss = sum(F.cross_entropy(out[k].float(), lab[k].to(dev)) for k in out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        done, losses, rate = train_loop(f"{kind} classifier", StepPlan(n_steps, n_steps), budget, progress, step_fn)
        sync(dev)
        seconds = budget.elapsed()
        clf.eval()
        acc_fn = _accuracy_image if kind == "image" else _accuracy_video
        acc = acc_fn(clf, data, r["eval_samples"], seed + 12345, dev)
        clf.cpu()
        to_float16(clf)
        folder = out_dir / f"{kind}_classifier"
        folder.mkdir(parents=True, exist_ok=True)
        clf.save_pretrained(folder)
        info = dict(model=f"{kind}_classifier", steps_done=done, steps_planned=n_steps, seconds=round(seconds, 1),
                    steps_per_s=rate,
                    seed=seed, device=str(dev), batch_size=bs, toy=toy, eval_accuracy=acc,
                    params=sum(p.numel() for p in clf.parameters()), losses=losses, torch=torch.__version__)
        write_info(folder, info)
        results[kind] = info
    return results
