"""Does the shipped video testbed follow one word of its caption? From the same seed, generate
the caption with every value of one factor (the five motions, or the four objects), let the
shipped classifier name the factor, and track the object's centroid over the frames.

    python scripts/probe_video_caption.py [--factor motion|object] [--seeds 0 1] [--steps 20]
                                          [--caption TEMPLATE] [--png grid.png]

TEMPLATE has one ``{}`` for the factor's phrase; defaults: "a red square {} over a plain
background" (motion: "moving left", ..., "standing still") and "a yellow {} moving right over a
plain background" (object). Prints, per seed and value, the classifier's probabilities for the
factor and the centroid (x, y in pixels) at every other frame (CPU, fp32). If every value gives
the same answer, the model has not tied that word to what it draws. ``--png`` writes the first
and last frame of each video.
"""

import argparse

import torch

from ditaccel.evaluate import load_trained
from ditaccel.testbed.data import VideoCaptions, hsv_to_rgb

PHRASES = {
    "motion": {m: ("standing still" if m == "still" else f"moving {m}") for m in VideoCaptions.MOTIONS},
    "object": {o: o for o in VideoCaptions.OBJECTS},
}
TEMPLATES = {"motion": "a red square {} over a plain background",
             "object": "a yellow {} moving right over a plain background"}


def centroids(video: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """(F, 2) centroid of the pixels closest to the colour ``rgb`` (3,) in a video (3, F, H, W) in [0, 1]."""
    dist = (video - rgb[:, None, None, None]).norm(dim=0)  # (F, H, W)
    w = (dist < 0.35).float()
    H, W = w.shape[-2:]
    ys, xs = torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32)
    n = w.sum((-1, -2)).clamp(min=1.0)
    return torch.stack([(w.sum(-2) * xs).sum(-1) / n, (w.sum(-1) * ys).sum(-1) / n], dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", choices=sorted(PHRASES), default="motion")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--caption", help="caption template; {} takes the factor's phrase")
    ap.add_argument("--png", help="write the first and last frame of every video here")
    a = ap.parse_args()
    phrases = PHRASES[a.factor]
    template = a.caption or TEMPLATES[a.factor]
    try:
        label = VideoCaptions.parse(template.format(next(iter(phrases.values()))))
    except ValueError as e:
        raise SystemExit(f"--caption: {e}") from None
    names = list(phrases)  # the factor's values, in VideoCaptions' order
    pipe, clf = load_trained("video")  # the shipped model and classifier, CPU, float32
    rgb = hsv_to_rgb(torch.tensor(VideoCaptions.HUES[label["colour"]]), torch.tensor(1.0), torch.tensor(1.0))
    captions = [template.format(p) for p in phrases.values()]
    grid = []
    for seed in a.seeds:
        gens = [torch.Generator().manual_seed(seed) for _ in captions]
        frames = pipe(captions, num_inference_steps=a.steps, generator=gens, output_type="pt").frames
        videos = frames.permute(0, 2, 1, 3, 4).float()  # (B, C, F, H, W) in [0, 1]
        grid.append(videos)
        with torch.no_grad():
            probs = clf(videos * 2 - 1)[a.factor].softmax(-1)
        print(f"seed {seed}  ({a.factor} probabilities in the order {', '.join(names)})")
        for i, value in enumerate(phrases):
            c = centroids(videos[i], rgb)[::2]
            path = " ".join(f"({x:.0f},{y:.0f})" for x, y in c.tolist())
            p = " ".join(f"{x:.2f}" for x in probs[i].tolist())
            print(f"  {value:>8}: classifier says {names[int(probs[i].argmax())]:>8} [{p}]; centroid {path}")
    if a.png:
        import matplotlib.pyplot as plt  # noqa: PLC0415

        v = torch.cat(grid)  # (N, C, F, H, W): one row per seed, first and last frame of each value
        cells = torch.stack([v[:, :, 0], v[:, :, -1]], dim=1)  # (N, 2, C, H, W)
        cells = torch.nn.functional.pad(cells, (1, 1, 1, 1), value=1.0)
        rows = cells.view(len(a.seeds), 2 * len(captions), *cells.shape[2:])  # (S, 2V, C, H, W)
        img = rows.permute(0, 3, 1, 4, 2).reshape(rows.shape[0] * rows.shape[3], -1, 3)
        plt.imsave(a.png, img.clamp(0, 1).numpy())
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
