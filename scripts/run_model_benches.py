"""Run the model-level benchmarks (ditaccel.bench_models) and write JSON + text to --out."""

import argparse
import json
import os

from ditaccel import bench_models as bm

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "."))
ap.add_argument("--only", default="hunyuan,pixart")
args = ap.parse_args()
for name, fn, fmt in (("hunyuan", bm.bench_hunyuan_adaspa, bm.format_hunyuan_adaspa),
                      ("pixart", bm.bench_pixart_plan, bm.format_pixart_plan)):
    if name not in args.only.split(","):
        continue
    r = fn()
    print(fmt(r), flush=True)
    with open(os.path.join(args.out, f"model-{name}.json"), "w") as f:
        json.dump(r, f, indent=1)
