"""How much of the video testbed's dense object/motion accuracy is the sampler's doing? Generate
the same balanced captions and seeds dense under several sampler settings (scheduler, steps, CFG
scale) and print the shipped classifier's accuracy per factor and the object confusion
matrix (rows: asked for, columns: recognised).

    python scripts/sweep_video_sampler.py [--weights DIR] [--samples 96] [--device cuda]
        [--dtype bfloat16] [--settings ddim:50:6 dpm:50:6 ...] [--json out.json]

A setting is ``scheduler:steps:guidance`` with scheduler ``ddim`` (CogVideoXDDIMScheduler, the
testbed's own) or ``dpm`` (CogVideoXDPMScheduler, same config). Both are deterministic: the
CogVideoX DDIM step accepts the pipeline's ``eta`` and ignores it (measured: identical samples).
"""

import argparse
import json
import time

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from ditaccel.evaluate import evaluate, load_trained
from ditaccel.testbed.data import VideoCaptions

DEFAULT_SETTINGS = ["ddim:50:6", "dpm:50:6", "ddim:50:10", "ddim:100:6"]
SCHEDULERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}


def parse_setting(text: str) -> tuple[str, int, float]:
    try:
        sched, steps, gs = text.split(":")
        if sched not in SCHEDULERS:
            raise ValueError(sched)
        return sched, int(steps), float(gs)
    except ValueError:
        raise SystemExit(f"--settings: {text!r} is not scheduler:steps:guidance with scheduler "
                         f"one of {sorted(SCHEDULERS)}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="folder with video/ and video_classifier/ (default: shipped)")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    settings = [parse_setting(s) for s in a.settings]
    pipe, clf = load_trained("video", weights_dir=a.weights, device=a.device, dtype=getattr(torch, a.dtype))
    base_config = dict(pipe.scheduler.config)
    names = VideoCaptions.OBJECTS
    # the captions evaluate() uses by default (balanced, seed 0), named here to know what was asked
    labels = VideoCaptions().balanced_labels(a.samples, 0)
    prompts = VideoCaptions.captions(labels)
    want = labels["object"]
    rows = []
    for sched, steps, gs in settings:
        pipe.scheduler = SCHEDULERS[sched].from_config(base_config)
        t0 = time.perf_counter()
        r = evaluate(pipe, n=a.samples, steps=steps, inputs=prompts, guidance_scale=gs, batch_size=a.batch_size,
                     classifier=clf, return_samples=True)
        x = r["samples_dense"]
        with torch.no_grad():
            pred = torch.cat([clf(x[i:i + a.batch_size].to(a.device) * 2 - 1)["object"].argmax(-1).cpu()
                              for i in range(0, len(x), a.batch_size)])
        row = {"setting": f"{sched}:{steps}:{gs:g}", "seconds": time.perf_counter() - t0,
               **{k: v for k, v in r.items() if k.startswith(("accuracy", "fd_"))}}
        conf = torch.zeros(len(names), len(names), dtype=torch.long)
        conf.index_put_((want, pred), torch.ones_like(pred), accumulate=True)
        row["object_confusion"] = conf.tolist()
        rows.append(row)
        acc = " ".join(f"{k.removeprefix('accuracy_dense_')} {v:.0%}" for k, v in row.items()
                       if k.startswith("accuracy_dense_"))
        print(f"{row['setting']:>14}: FD {row['fd_dense']:.1f}  {acc}  ({row['seconds']:.0f} s)", flush=True)
        print("    confusion (rows asked " + "/".join(names) + "):", row["object_confusion"], flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"weights": a.weights or "shipped", "samples": a.samples, "dtype": a.dtype,
                       "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
