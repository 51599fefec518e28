"""Why does AdaSpa lose so much PSNR on the video testbed: the sampler's sensitivity, or the
attention mass it drops? One seed of the shipped video model, dense, then:

* dense with Gaussian noise of a given fraction of the prediction's standard deviation added to
  every transformer output after the first ``--warmup-calls`` calls (a perturbation of known size
  where AdaSpa starts to act: its default warm-up is 20% of the steps);
* AdaSpa at several settings, with its per-layer recall (attention mass kept by the searched
  blocks) at each search and its attention-FLOPs ratio.

    python scripts/probe_video_adaspa.py [--seed 2] [--steps 20] [--caption TEXT] [--json out.json]

Prints the mean q/k LayerNorm weight of each layer (CogVideoX normalises q and k per head, so
a logit is at most sqrt(head_dim) * w_q * w_k), then the PSNR (dB, float pixels in [0, 1]) of
each run against the dense video (CPU, fp32).
"""

import argparse
import json

import torch

import ditaccel
from ditaccel.evaluate import psnr
from ditaccel.testbed.pixel import load_video_pipeline

ADASPA = {
    "s=0.8": dict(sparsity=0.8),
    "s=0.8, no text sink": dict(sparsity=0.8, text_sink=False),
    "s=0.8, block 16": dict(sparsity=0.8, block_size=16),
    "s=0.8, dense warm-up half the steps": dict(sparsity=0.8, warmup=0.5, search_at=(0.5, 0.7)),
    "s=0.5": dict(sparsity=0.5),
}
NOISE = (0.003, 0.01, 0.03)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--caption", default="a blue circle moving up over stripes")
    ap.add_argument("--warmup-calls", type=int, default=4, help="noise runs: unperturbed transformer calls first")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    pipe = load_video_pipeline()
    with torch.no_grad():
        norms = [(float(b.attn1.norm_q.weight.abs().mean()), float(b.attn1.norm_k.weight.abs().mean()))
                 for b in pipe.transformer.transformer_blocks]
    print("q/k LayerNorm weight per layer: " + ", ".join(f"{q:.2f}/{k:.2f}" for q, k in norms), flush=True)

    def generate():
        g = torch.Generator().manual_seed(a.seed)
        return pipe([a.caption], num_inference_steps=a.steps, generator=g, output_type="pt").frames.float()

    dense = generate()
    results = []
    tr, forward = pipe.transformer, pipe.transformer.forward
    for rel in NOISE:
        calls = [0]

        def noisy(*args, rel=rel, calls=calls, **kwargs):
            out = forward(*args, **kwargs)
            calls[0] += 1
            if calls[0] > a.warmup_calls:
                pred = out[0] if isinstance(out, tuple) else out.sample
                g = torch.Generator().manual_seed(calls[0])
                pred.add_(torch.randn(pred.shape, generator=g) * rel * pred.std())
            return out

        tr.forward = noisy
        try:
            video = generate()
        finally:
            del tr.forward  # back to the class's forward
        r = {"run": f"dense + noise {100 * rel:g}% of the prediction's std", "psnr": psnr(dense, video)}
        print(f"{r['run']}: {r['psnr']:.2f} dB", flush=True)
        results.append(r)
    for name, kw in ADASPA.items():
        ditaccel.apply(pipe, ditaccel.AdaSpaConfig(**kw))
        try:
            video = generate()
            st = ditaccel.stats(pipe)
        finally:
            ditaccel.remove(pipe)
        recall = st.details["recall_per_search"]
        r = {"run": f"AdaSpa {name}", "config": kw, "psnr": psnr(dense, video),
             "attention_flops_ratio": st.attention_flops_ratio, "recall_per_layer_per_search": recall}
        per_layer = ", ".join("/".join(f"{100 * x:.0f}" for x in layer) for layer in recall)
        print(f"{r['run']}: {r['psnr']:.2f} dB, attention FLOPs {100 * st.attention_flops_ratio:.1f}%, "
              f"recall % per layer (at each search): {per_layer}", flush=True)
        results.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"seed": a.seed, "steps": a.steps, "caption": a.caption, "qk_norm_weights": norms,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
