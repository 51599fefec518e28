"""PSNR against dense vs attention FLOPs on the trained video testbed: DiTFastAttn, AdaSpa and mixed
plans (DiTFastAttn's candidates plus AdaSpa's "sparse") at the same thresholds.

    python scripts/compare_mixed_plans.py --n 4 --steps 20 --json docs/results/DATE-cpu-mixed-plans.json

Every method is compared with the same dense set (same seeds and prompts); DiTFastAttn and mixed plans
are calibrated here on ``--calibration`` prompts (the plan search is part of the cost of a plan, not of
a generation: calibration seconds are reported apart).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

import ditaccel
from ditaccel.evaluate import default_inputs, evaluate
from ditaccel.testbed.pixel import load_video_pipeline

MIXED_CANDIDATES = ("ast", "sparse", "wars+asc", "wars", "asc")


def methods(thresholds, sparsities, mixed_sparsity, mixed_candidates=MIXED_CANDIDATES, window="band1d",
            first_lse=("fresh",)):
    """(name, method) rows: per threshold DiTFastAttn then the mixed plan (both with ``window``), then
    AdaSpa per sparsity and ``first_lse``."""
    out = []
    tag = "" if window == "band1d" else f" {window}"
    for d in thresholds:
        out.append((f"ditfastattn {d}{tag}", ditaccel.DiTFastAttnConfig(threshold=d, window=window, show_progress=False)))
        out.append((f"mixed {d} (s={mixed_sparsity}){tag}", ditaccel.DiTFastAttnConfig(
            threshold=d, candidates=tuple(mixed_candidates), adaspa=ditaccel.AdaSpaConfig(sparsity=mixed_sparsity),
            window=window, show_progress=False)))
    for s in sparsities:
        for f in first_lse:
            tag = "" if tuple(first_lse) == ("fresh",) else f" first_lse={f}"
            out.append((f"adaspa s={s}{tag}", ditaccel.AdaSpaConfig(sparsity=s, first_lse=f)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4, help="samples per method")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calibration", type=int, default=2, help="calibration prompts for DiTFastAttn / mixed plans")
    p.add_argument("--thresholds", default="D2,D4")
    p.add_argument("--sparsities", default="0.5,0.8")
    p.add_argument("--mixed-sparsity", type=float, default=0.8)
    p.add_argument("--window", default="band1d", help="the window of wars steps: band1d, neighborhood2d, neighborhood3d")
    p.add_argument("--mixed-candidates", default=",".join(MIXED_CANDIDATES),
                   help="the mixed plans' candidate order (the greedy search takes the first within budget)")
    p.add_argument("--only", default="ditfastattn,mixed,adaspa", help="which kinds of rows to run")
    p.add_argument("--first-lse", default="fresh", help="AdaSpa rows for each of these first_lse values")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the rows and the run's settings here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    pipe = load_video_pipeline()
    dense = evaluate(pipe, None, n=a.n, steps=a.steps, return_samples=True)
    cal = default_inputs(pipe, "video", a.calibration, 1)  # balanced captions, as evaluate's default
    rows = []
    print(f"{'method':<26} {'attn FLOPs':>10} {'PSNR dB':>8} {'calib s':>8}  counts")
    for name, method in methods(a.thresholds.split(","), [float(s) for s in a.sparsities.split(",")],
                                a.mixed_sparsity, a.mixed_candidates.split(","), a.window,
                                a.first_lse.split(",")):
        if name.split()[0] not in a.only.split(","):
            continue
        r = evaluate(pipe, method, n=a.n, steps=a.steps, dense=dense, calibration_inputs=cal)
        row = {"method": name, "attention_flops_ratio": r["attention_flops_ratio"], "psnr": r["psnr"],
               "psnr_min": r["psnr_min"], "calibration_s": r.get("calibration_s", 0.0),
               "method_counts": r.get("method_counts")}
        rows.append(row)
        print(f"{name:<26} {100 * row['attention_flops_ratio']:9.1f}% {row['psnr']:8.2f} "
              f"{row['calibration_s']:8.1f}  {row['method_counts']}", flush=True)
        if a.json:  # after every row: a run cut short keeps what it measured
            _write(a, rows, t0)
    return 0


def _write(a, rows, t0):
    if a.json:
        doc = {"date": datetime.date.today().isoformat(), "device": f"cpu ({platform.processor() or platform.machine()}, "
               f"{a.threads} threads)", "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
               "ditaccel": ditaccel.__version__, "n": a.n, "steps": a.steps, "calibration_prompts": a.calibration,
               "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
