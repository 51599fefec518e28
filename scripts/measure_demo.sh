#!/usr/bin/env bash
# The README's first command, timed on a fresh clone: `ditaccel demo` wall time (the install not
# counted), with the demo's own result.json, written to docs/results/<date>-cpu-demo.json.
#
#   scripts/measure_demo.sh [extra demo args, e.g. --calibrate --threshold D1]
#
# Run it on an otherwise idle machine: other jobs on the same cores inflate the time.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/ditaccel"
cd "$work/ditaccel"
python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.13.0 -e .
start=$(date +%s.%N)
ditaccel demo --out demo-out "$@"
end=$(date +%s.%N)
suffix="$(printf '%s' "$*" | tr -c 'A-Za-z0-9' '-' | sed 's/-\+/-/g; s/^-//; s/-$//')"
out="$repo/docs/results/$(date +%Y-%m-%d)-cpu-demo${suffix:+-$suffix}.json"
python - "$start" "$end" "$out" "$*" <<'EOF'
import json, os, subprocess, sys
start, end, out, extra = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
res = json.load(open("demo-out/result.json"))
res.update(command=("ditaccel demo " + extra).strip(), wall_s=round(end - start, 2), cpu_cores=os.cpu_count(),
           load_average_at_end=os.getloadavg(), fresh_clone_of=subprocess.check_output(
               ["git", "rev-parse", "HEAD"], text=True).strip(),
           timed="wall time of the ditaccel command on a fresh clone, install excluded (scripts/measure_demo.sh)")
json.dump(res, open(out, "w"), indent=1)
print(f"wall {res['wall_s']} s -> {out}")
EOF
