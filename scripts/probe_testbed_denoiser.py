"""Does the shipped image testbed know its classes? Noise real procedural images to a timestep,
take the model's one-step estimate of the clean image (v-prediction: x0 = sqrt(a) x_t - sqrt(1-a) v)
with the true label, the null label and CFG 4, and let the shipped classifier name it.

    python scripts/probe_testbed_denoiser.py [--n 24] [--timesteps 950 800 600 400]

Prints, per timestep, the RMS error of the estimate and the classifier's accuracy on it (CPU, fp32).
"""

import argparse

import torch

from ditaccel.testbed.classifier import ImageClassifier
from ditaccel.testbed.data import ImageClasses
from ditaccel.testbed.pixel import WEIGHTS_DIR, load_image_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--timesteps", type=int, nargs="+", default=[950, 800, 600, 400])
    a = ap.parse_args()
    pipe = load_image_pipeline()
    tr, ac = pipe.transformer, pipe.scheduler.alphas_cumprod
    if pipe.scheduler.config.prediction_type != "v_prediction":
        raise SystemExit("the shipped image model is not a v-prediction model")
    clf = ImageClassifier.from_pretrained(str(WEIGHTS_DIR / "image_classifier")).float().eval()
    classes = tr.config.num_embeds_ada_norm
    x0, y = ImageClasses(tr.config.sample_size).sample(a.n, 7, labels=torch.arange(a.n) % classes)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in a.timesteps:
            al = ac[t]
            xt = al.sqrt() * x0 + (1 - al).sqrt() * noise
            ts = torch.full((a.n,), t)
            v_true = tr(xt, timestep=ts, class_labels=y).sample
            v_null = tr(xt, timestep=ts, class_labels=torch.full_like(y, classes)).sample
            cells = []
            for name, v in (("true label", v_true), ("null label", v_null),
                            ("cfg 4", v_null + 4 * (v_true - v_null))):
                est = (al.sqrt() * xt - (1 - al).sqrt() * v).clamp(-1, 1)
                acc = (clf(est).argmax(-1) == y).float().mean().item()
                cells.append(f"{name}: rms {(est - x0).pow(2).mean().sqrt():.3f}, classified {acc:.2f}")
            print(f"t={t} (SNR {float(al / (1 - al)):.3g}): " + " | ".join(cells))


if __name__ == "__main__":
    main()
