"""At which noise levels does the shipped video testbed take an object's shape from the caption?
Noise real procedural videos to timestep t, let the model predict the clean video in one step
(v-prediction: x0 = sqrt(a) x_t - sqrt(1 - a) v) with the true caption and with a caption whose
object word is wrong, and let the shipped classifier name the object of each prediction.

    python scripts/probe_video_x0.py [--samples 24] [--t 200 400 600 800] [--seed 7]

Prints, per t: how often the prediction shows the captioned object, and with the wrong word how
often it shows the word's object and how often the true one (CPU, fp32). A model that draws the
shape its caption names follows the word where the noisy input no longer shows the shape.
"""

import argparse

import torch

from ditaccel.evaluate import load_trained
from ditaccel.testbed.data import VideoCaptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--t", type=int, nargs="+", default=[200, 400, 600, 800])
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    pipe, clf = load_trained("video")  # the shipped model and classifier, CPU, float32
    tr, scheduler = pipe.transformer, pipe.scheduler
    video, captions, labels = VideoCaptions(tr.config.sample_frames, tr.config.sample_height).sample(a.samples, a.seed)
    wrong = dict(labels, object=(labels["object"] + 2) % len(VideoCaptions.OBJECTS))
    x0 = video.permute(0, 2, 1, 3, 4)  # (B, F, C, H, W)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(a.seed + 1))
    with torch.no_grad():
        texts = [pipe.encode_prompt(c, do_classifier_free_guidance=False, device="cpu",
                                   max_sequence_length=tr.config.max_text_seq_length)[0]
                 for c in (captions, VideoCaptions.captions(wrong))]
        for t in a.t:
            alpha = scheduler.alphas_cumprod[t]
            xt = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
            named = []
            for text in texts:
                v = torch.cat([tr(hidden_states=xt[i:i + 1], encoder_hidden_states=text[i:i + 1],
                                  timestep=torch.tensor([t]), return_dict=False)[0] for i in range(a.samples)])
                pred = (alpha.sqrt() * xt - (1 - alpha).sqrt() * v).clamp(-1, 1)
                named.append(clf(pred.permute(0, 2, 1, 3, 4))["object"].argmax(-1))
            snr = float(alpha / (1 - alpha))
            rate = lambda hit: f"{float(hit.float().mean()):.0%}"  # noqa: E731
            print(f"t={t} (SNR {snr:.3g}): true caption -> its object {rate(named[0] == labels['object'])}; "
                  f"wrong object word -> the word's object {rate(named[1] == wrong['object'])}, "
                  f"the true object {rate(named[1] == labels['object'])}", flush=True)


if __name__ == "__main__":
    main()
