"""Does the shipped video testbed follow the motion word of its caption? Generate the same object
with each of the five motions ("moving left/right/up/down", "standing still") from the same seed,
track the object's centroid over the frames and let the shipped classifier name motion and object.

    python scripts/probe_video_motion.py [--seeds 0 1] [--steps 20] [--caption TEMPLATE]

TEMPLATE defaults to "a red square {} over a plain background". Prints, per seed and motion,
the classifier's motion and object, and the centroid (x, y in pixels) at every other frame (CPU,
fp32). If the four directions give the same path, the model has not yet tied the direction word
to the motion.
"""

import argparse

import torch

from ditaccel.testbed.classifier import VideoClassifier
from ditaccel.testbed.data import VideoCaptions, hsv_to_rgb
from ditaccel.testbed.pixel import WEIGHTS_DIR, load_video_pipeline

MOTIONS = {m: ("standing still" if m == "still" else f"moving {m}") for m in VideoCaptions.MOTIONS}


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
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--caption", default="a red square {} over a plain background",
                    help="caption template; {} takes the motion phrase")
    a = ap.parse_args()
    try:
        label = VideoCaptions.parse(a.caption.format("standing still"))
    except ValueError as e:
        raise SystemExit(f"--caption: {e}") from None
    pipe = load_video_pipeline()
    clf = VideoClassifier.from_pretrained(str(WEIGHTS_DIR / "video_classifier")).float().eval()
    rgb = hsv_to_rgb(torch.tensor(VideoCaptions.HUES[label["colour"]]), torch.tensor(1.0), torch.tensor(1.0))
    captions = [a.caption.format(phrase) for phrase in MOTIONS.values()]
    for seed in a.seeds:
        gens = [torch.Generator().manual_seed(seed) for _ in captions]
        frames = pipe(captions, num_inference_steps=a.steps, generator=gens, output_type="pt").frames
        videos = frames.permute(0, 2, 1, 3, 4).float()  # (B, C, F, H, W) in [0, 1]
        with torch.no_grad():
            out = clf(videos * 2 - 1)
        print(f"seed {seed}")
        for i, m in enumerate(MOTIONS):
            c = centroids(videos[i], rgb)[::2]
            path = " ".join(f"({x:.0f},{y:.0f})" for x, y in c.tolist())
            print(f"  {m:>5}: classifier motion {VideoCaptions.MOTIONS[int(out['motion'][i].argmax())]:>5}, "
                  f"object {VideoCaptions.OBJECTS[int(out['object'][i].argmax())]:>8}; centroid {path}")


if __name__ == "__main__":
    main()
