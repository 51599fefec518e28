"""Run the model-level benchmarks (ditaccel.bench.model_cases) and write JSON + text to --out."""

import argparse
import json
import os

from ditaccel.bench import model_cases as bm
from ditaccel.bench import report

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "."))
ap.add_argument("--only", default="hunyuan,pixart")
args = ap.parse_args()
for name, fn, fmt in (("hunyuan", bm.bench_hunyuan_adaspa, report.format_hunyuan_adaspa),
                      ("pixart", bm.bench_pixart_plan, report.format_pixart_plan)):
    if name not in args.only.split(","):
        continue
    r = fn()
    print(fmt(r), flush=True)
    with open(os.path.join(args.out, f"model-{name}.json"), "w") as f:
        json.dump(r, f, indent=1)
