"""Quality cost of float8 DiTFastAttn caches on the trained image testbed: the same plans run with
caches in the model's dtype and in float8 (``DiTFastAttnConfig.cache_dtype``), each against dense.

    python scripts/compare_cache_dtype.py --n 8 --steps 20 --thresholds D2,D4,D6 --dtypes float32,bfloat16 \\
        --json docs/results/DATE-cpu-cache-dtype-quality.json

Per threshold, one plan is calibrated (greedy search, caches in the model's dtype, ``--calibration``
class labels) and applied twice, ``plan.with_cache_dtype("model")`` and ``("float8")``, to the
same seeds and labels; both are scored against one dense set (PSNR / SSIM, mean and worst sample),
with the peak cache bytes ``ditaccel.stats`` counts in one more generation of one sample (batch 1
+ CFG). The difference of the two PSNRs is the quality
cost of storing the caches in 8 bits. Each of ``--dtypes`` is a run of its own (its dense set, its
plans): float32, the testbed's CPU default, compares float8 with float32 caches (stricter than with
bf16 caches); bfloat16 compares it with the caches a GPU run keeps.
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
from ditaccel.evaluate import default_inputs, evaluate, load_trained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_peak(pipe, plan, steps: int) -> int:
    """``ditaccel.stats(pipe).cache_bytes_peak`` of one generation of one sample (batch 1 + CFG)."""
    ditaccel.apply(pipe, plan)
    try:
        pipe(class_labels=[0], num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")
        return ditaccel.stats(pipe).cache_bytes_peak
    finally:
        ditaccel.remove(pipe)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="samples (seeds 0..n-1, classes i %% 12)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calibration", type=int, default=4, help="calibration class labels per plan")
    p.add_argument("--thresholds", default="D2,D4,D6")
    p.add_argument("--dtypes", default="float32", help=f"the model's dtypes, comma-separated, each a run of its own "
                   f"(of {', '.join(DTYPES)})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the rows and the run's settings here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    doc = {"date": datetime.date.today().isoformat(),
           "device": f"cpu ({platform.processor() or platform.machine()}, {a.threads} thread(s))",
           "command": "python " + " ".join(["scripts/compare_cache_dtype.py", *sys.argv[1:]]),
           "torch": torch.__version__, "ditaccel": ditaccel.__version__, "testbed": "image (trained, shipped weights)",
           "n": a.n, "steps": a.steps, "thresholds": a.thresholds.split(","),
           "compared": "per model dtype and threshold, one plan (calibrated with caches in the model's dtype) run "
                       "with caches in the model's dtype and in float8; PSNR / SSIM against that dtype's dense set; "
                       "psnr_cost_db = PSNR(model-dtype caches) - PSNR(float8 caches)",
           "runs": []}
    print(f"{'dtype':<9} {'plan':<5} {'caches':<7} {'attn FLOPs':>10} {'PSNR dB':>8} {'PSNR min':>8} {'SSIM':>7} "
          f"{'cache KiB':>9}")
    for dtype in a.dtypes.split(","):
        pipe, _ = load_trained("image", dtype=DTYPES[dtype])
        pipe.set_progress_bar_config(disable=True)
        dense = evaluate(pipe, None, n=a.n, steps=a.steps, return_samples=True)
        cal = default_inputs(pipe, "image", a.calibration, 1)
        tr = pipe.transformer
        run = {"model_dtype": dtype, "time_dense_s": dense["time_dense_s"], "calibration_labels": cal,
               "shapes": {"tokens": (tr.config.sample_size // tr.config.patch_size) ** 2,
                          "layers": tr.config.num_layers, "heads": tr.config.num_attention_heads,
                          "head_dim": tr.config.attention_head_dim,
                          "cache_bytes_batch": "1 sample + CFG (2 rows)"},
               "rows": []}
        doc["runs"].append(run)
        for d in doc["thresholds"]:
            t1 = time.perf_counter()
            plan = ditaccel.calibrate(pipe, ditaccel.DiTFastAttnConfig(threshold=d, show_progress=False),
                                      num_inference_steps=a.steps, class_labels=cal,
                                      generator=torch.Generator().manual_seed(10_007))
            row = {"threshold": d, "calibration_s": round(time.perf_counter() - t1, 1), "plan_counts": plan.counts()}
            for cache_dtype in ("model", "float8"):
                variant = plan.with_cache_dtype(cache_dtype)
                r = evaluate(pipe, variant, n=a.n, steps=a.steps, dense=dense)
                peak = cache_peak(pipe, variant, a.steps)
                row[cache_dtype] = {"psnr": r["psnr"], "psnr_min": r["psnr_min"], "ssim": r["ssim"],
                                    "ssim_min": r["ssim_min"], "attention_flops_ratio": r["attention_flops_ratio"],
                                    "cache_bytes_peak": peak}
                print(f"{dtype:<9} {d:<5} {cache_dtype:<7} {100 * r['attention_flops_ratio']:9.1f}% {r['psnr']:8.2f} "
                      f"{r['psnr_min']:8.2f} {r['ssim']:7.4f} {peak / 2**10:9.1f}", flush=True)
            row["psnr_cost_db"] = row["model"]["psnr"] - row["float8"]["psnr"]
            row["cache_bytes_ratio"] = row["float8"]["cache_bytes_peak"] / row["model"]["cache_bytes_peak"]
            print(f"{dtype:<9} {d:<5} PSNR cost of float8 caches {row['psnr_cost_db']:+.3f} dB, cache bytes "
                  f"x{row['cache_bytes_ratio']:.3f}", flush=True)
            run["rows"].append(row)
            doc["seconds"] = round(time.perf_counter() - t0, 1)
            if a.json:  # after every row: a run cut short keeps what it measured
                with open(a.json, "w") as f:
                    json.dump(doc, f, indent=1)
                    f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
