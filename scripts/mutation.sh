#!/usr/bin/env bash
# Mutation testing (issue 16 §1, docs/MUTATION.md): mutmut 3 over the five decision-making modules,
# one file at a time, each against the test files relevant to it.
#
#   scripts/mutation.sh [FILE ...]      # default: all five; prints killed / total per file
#
# Never touches this checkout: it makes a git worktree of HEAD (WT, default /work/wt-mutation or
# $TMPDIR/ditaccel-mutation), a venv beside it that sees this checkout's .venv packages (torch,
# diffusers) but imports ditaccel only from the worktree, and runs mutmut there (it mutates a copy in
# WT/mutants/). Results: WT/results/<file>.meta (mutmut's raw verdicts) and WT/results/summary.json
# (per file: total, killed, survived, timeout, surviving mutant ids with their diffs).
# Runtime on 2 shared CPU cores: about an hour for all five (runtime.py is the slowest: its
# functions run under almost every test). Env: JOBS (mutmut children, default 2), KEEP=1 keeps WT
# (else the results are copied to OUT, default $TMPDIR/ditaccel-mutation-results, and WT removed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WT="${WT:-/work/wt-mutation}"
[ -d "$(dirname "$WT")" ] && [ -w "$(dirname "$WT")" ] || WT="${TMPDIR:-/tmp}/ditaccel-mutation"
JOBS="${JOBS:-2}"
MUTMUT_VERSION="3.8.1"
MAIN_PY="$ROOT/.venv/bin/python"
[ -x "$MAIN_PY" ] || MAIN_PY="$(command -v python3)"

FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(src/ditaccel/methods/adaspa.py src/ditaccel/runtime.py src/ditaccel/plan.py
                                 src/ditaccel/calibrate.py src/ditaccel/methods/ditfastattn.py)

# the tests each file is mutated against (mutmut then runs, per mutant, only those of them that call
# the mutated function); slow multi-process and CLI suites are left out (docs/MUTATION.md)
tests_for() {
  case "$1" in
    src/ditaccel/plan.py) echo tests/test_plan.py tests/test_ditfastattn.py tests/test_calibrate_loss.py \
      tests/test_mutation_kills_plan.py tests/test_cache_dtype.py ;;
    src/ditaccel/calibrate.py) echo tests/test_greedy_reference.py tests/test_calibrate_loss.py \
      tests/test_ditfastattn.py tests/test_mutation_kills_calibrate.py ;;
    src/ditaccel/methods/ditfastattn.py) echo tests/test_ditfastattn.py tests/test_ditfastattn_wa.py \
      tests/test_greedy_reference.py tests/test_calibrate_loss.py tests/test_plan.py \
      tests/test_mutation_kills_ditfastattn.py tests/test_mutation_kills_calibrate.py tests/test_cache_dtype.py ;;
    src/ditaccel/methods/adaspa.py) echo tests/test_adaspa.py tests/test_adaspa_options.py \
      tests/test_adaspa_reference.py tests/test_adaspa_memory.py tests/test_runtime_checks.py \
      tests/test_video_adapters.py tests/test_mutation_kills_adaspa.py ;;
    src/ditaccel/runtime.py) echo tests/test_runtime_checks.py tests/test_ditfastattn.py tests/test_adaspa.py \
      tests/test_plan.py tests/test_adaspa_reference.py tests/test_video_adapters.py \
      tests/test_mutation_kills_runtime.py ;;
    *) echo "no test selection for $1" >&2; return 1 ;;
  esac
}

# 1. the worktree (a fresh one each run) and its venv
if [ -d "$WT" ]; then git -C "$ROOT" worktree remove --force "$WT" 2>/dev/null || rm -rf "$WT"; fi
git -C "$ROOT" worktree prune
git -C "$ROOT" worktree add --detach "$WT" HEAD >/dev/null
echo "worktree $WT at $(git -C "$WT" rev-parse --short HEAD)"
"$MAIN_PY" -m venv "$WT/.venv-mut"
SITE="$("$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
VSITE="$("$WT/.venv-mut/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$SITE" > "$VSITE/ditaccel-main-venv.pth"  # torch & co.; its editable ditaccel .pth is not processed here
"$WT/.venv-mut/bin/python" -m pip install -q "mutmut==$MUTMUT_VERSION"
PY="$WT/.venv-mut/bin/python"
(cd "$WT" && PYTHONPATH="$WT/src" "$PY" -c 'import ditaccel, sys; assert ditaccel.__file__.startswith(sys.argv[1]), ditaccel.__file__' "$WT/src")
mkdir -p "$WT/results"

# 2. one mutmut run per file
cd "$WT"
for f in "${FILES[@]}"; do
  echo "== $f"
  {
    echo "[mutmut]"
    echo "source_paths = src"
    echo "only_mutate = $f"
    # exception messages and warning texts are not mutated (docs/MUTATION.md: excluded)
    printf 'do_not_mutate_patterns =\n    ^\\s*raise\\s\n    ^\\s*warnings\\.warn\\(\n'
    echo "pytest_add_cli_args = -p no:cacheprovider"
    echo "pytest_add_cli_args_test_selection ="
    for t in $(tests_for "$f"); do echo "    $t"; done
    echo "use_git_change_detection = false"
    # files some tests read from the repository root (mutmut runs the tests inside mutants/)
    printf 'also_copy =\n    README.md\n    BENCHMARKS.md\n    QUALITY.md\n    docs\n    scripts\n'
  } > setup.cfg
  rm -rf mutants
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 15 "$WT/.venv-mut/bin/mutmut" run --max-children "$JOBS" \
    > "results/$(basename "$f").log" 2>&1 || { tail -c 3000 "results/$(basename "$f").log"; exit 1; }
  cp "mutants/$f.meta" "results/$(basename "$f").meta"
  "$PY" - "$f" <<'EOF'
import json, subprocess, sys
from pathlib import Path
f = sys.argv[1]
codes = json.loads(Path("mutants", f + ".meta").read_text())["exit_code_by_key"]
status = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}
st = {k: status.get(v, "suspicious") for k, v in codes.items()}
row = {s: sum(x == s for x in st.values()) for s in ("killed", "survived", "timeout", "no tests", "suspicious")}
row["total"] = len(st)
surv = {}
for k, s in st.items():
    if s in ("survived", "no tests", "suspicious"):
        d = subprocess.run([sys.executable, "-m", "mutmut", "show", k], capture_output=True, text=True).stdout
        surv[k] = {"status": s, "diff": "\n".join(l for l in d.splitlines()
                                                 if l[:1] in "+-" and not l.startswith(("---", "+++")))}
row["surviving"] = surv
out = Path("results/summary.json")
summary = json.loads(out.read_text()) if out.exists() else {}
summary[f] = row
out.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
EOF
done

# 3. scores (a timeout counts as killed, as in mutmut's own score)
"$PY" - <<'EOF'
import json
from pathlib import Path
summary = json.loads(Path("results/summary.json").read_text())
tk = tt = 0
for f, r in summary.items():
    k = r["killed"] + r["timeout"]
    tk, tt = tk + k, tt + r["total"]
    print(f"{f:40s} {k:5d} / {r['total']:5d} killed  {100 * k / max(r['total'], 1):5.1f}%  "
          f"(survived {r['survived']}, no tests {r['no tests']}, timeout {r['timeout']})")
print(f"{'overall':40s} {tk:5d} / {tt:5d} killed  {100 * tk / max(tt, 1):5.1f}%")
EOF
echo "results in $WT/results"
if [ "${KEEP:-0}" != 1 ]; then
  OUT="${OUT:-${TMPDIR:-/tmp}/ditaccel-mutation-results}"
  mkdir -p "$OUT" && cp -r "$WT/results/." "$OUT/"
  cd "$ROOT" && git worktree remove --force "$WT" && echo "copied to $OUT; worktree removed"
fi
