#!/usr/bin/env bash
# How the shipped testbed weights (src/ditaccel/testbed/weights) are trained, on one GPU.
#
# The image and video generators train side by side on the one GPU, each for MINUTES of wall
# clock (default 17.5; the learning-rate schedule is fitted to it from the measured step rate),
# while the two classifiers train in the foreground. Two phases, so that each fits in a
# 10-minute command on a lent machine; on your own machine run both in a row:
#
#   scripts/train_testbed.sh start  WORKDIR [OUTDIR]   # launch the generators, train classifiers
#   scripts/train_testbed.sh finish WORKDIR [OUTDIR]   # wait, check dense quality, pack weights
#
# Or train each alone: `ditaccel testbed train image|video|classifiers` (default: into the package).
set -euo pipefail
phase=${1:?start or finish}
W=${2:?work dir}
OUT=${3:-$W/out}
MINUTES=${MINUTES:-17.5}
EXTRA=${EXTRA:-}      # e.g. EXTRA=--toy for a CPU smoke run
SAMPLES=${SAMPLES:-96}
EXTRA_EVAL=${EXTRA_EVAL:-}  # e.g. EXTRA_EVAL="--steps 2"
mkdir -p "$W" "$OUT"
case $phase in
start)
  for m in image video; do
    setsid nohup python3 -m ditaccel testbed train "$m" --out "$W/$m" --minutes "$MINUTES" $EXTRA \
      >"$W/$m.log" 2>&1 </dev/null &
  done
  python3 -m ditaccel testbed train classifiers --out "$W" --minutes 4 $EXTRA >"$W/classifiers.log" 2>&1
  tar czf "$OUT/classifiers.tgz" -C "$W" image_classifier video_classifier
  ;;
finish)
  while pgrep -f "ditaccel testbed train" >/dev/null; do sleep 5; done
  for m in image video; do
    tar czf "$OUT/$m.tgz" -C "$W" "$m"
    python3 -m ditaccel eval --model "$m" --method dense --weights "$W" --samples "$SAMPLES" $EXTRA_EVAL \
      --json "$OUT/eval_$m.json" --samples-png "$OUT/samples_$m.png"
  done
  ;;
*) echo "phase must be start or finish" >&2; exit 2 ;;
esac
