"""Is the shipped video classifier too strict for soft shapes? Blur real procedural videos (a
Gaussian of sigma px, per frame) and print its object accuracy and confusion at each sigma.

    python scripts/probe_classifier_blur.py [--samples 192] [--sigmas 0 1 1.5 2 3] [--seed 123]

If blurred squares stay squares while the generator's squares are read as circles, the generator
rounds them more than any blur does: the classifier is not what fails them (CPU, fp32).
"""

import argparse

import torch
import torch.nn.functional as F

from ditaccel.testbed.classifier import VideoClassifier
from ditaccel.testbed.data import VideoCaptions
from ditaccel.testbed.pixel import WEIGHTS_DIR


def blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each frame of videos (B, C, F, H, W), edges replicated."""
    if sigma <= 0:
        return video
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=video.dtype)
    k = torch.exp(-t**2 / (2 * sigma**2))
    k = k / k.sum()
    B, C, Fr, H, W = video.shape
    y = video.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return y.reshape(B, Fr, C, H, W).permute(0, 2, 1, 3, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--seed", type=int, default=123)
    a = ap.parse_args()
    clf = VideoClassifier.from_pretrained(str(WEIGHTS_DIR / "video_classifier")).float().eval()
    videos, _, labels = VideoCaptions().sample(a.samples, a.seed)
    want, k = labels["object"], len(VideoCaptions.OBJECTS)
    print("rows: real " + "/".join(VideoCaptions.OBJECTS) + "; columns: recognised")
    for sigma in a.sigmas:
        with torch.no_grad():
            pred = clf(blur(videos, sigma))["object"].argmax(-1)
        conf = torch.zeros(k, k, dtype=torch.long)
        conf.index_put_((want, pred), torch.ones_like(pred), accumulate=True)
        print(f"sigma {sigma:g} px: object accuracy {(pred == want).double().mean():.1%}, confusion {conf.tolist()}")


if __name__ == "__main__":
    main()
