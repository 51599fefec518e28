#!/usr/bin/env bash
# How the shipped testbed weights (src/ditaccel/testbed/weights) are trained, on one GPU.
#
# Each generator trains alone on the GPU for MINUTES of wall clock (default 19; the learning-rate
# schedule is fitted to it from the measured step rate; torch.compile on CUDA). Phases, so that
# a run fits in 10-minute commands on a lent machine (a launched training runs detached):
#
#   scripts/train_testbed.sh classifiers   WORKDIR [OUTDIR]   # both classifiers (~1.5 min)
#   scripts/train_testbed.sh launch MODEL  WORKDIR            # MODEL = image | video, detached
#   scripts/train_testbed.sh finish MODEL  WORKDIR [OUTDIR]   # wait, pack, check dense quality
#   scripts/train_testbed.sh all           WORKDIR [OUTDIR]   # all of it in a row (own machine)
#
# finish writes OUTDIR/MODEL.tgz, eval_MODEL.json (dense accuracy etc.) and samples_MODEL.png.
# With the classifiers trained first, each run also probes its learning curve every PROBE_EVERY
# minutes (default 3; `curve` in train_info.json).
# Or train each alone: `ditaccel testbed train image|video|classifiers` (default: into the package).
#
# The shipped set (2026-11-25, H100, seed 0) was made within two sessions' device time as:
#   image and image classifier: MINUTES=17 PROBE_EVERY=4: classifiers; launch image; launch video
#   (both at once, sharing the GPU); finish image; then `ditaccel testbed train image --minutes
#   2.5 --init W/image` alone (19.5 min of image training in all);
#   video and video classifier (2026-11-25, a later session, for squares of half-side 0.9 r):
#   `ditaccel testbed train classifiers --only video --out W --minutes 1.5`; then
#   MINUTES=19 PROBE_EVERY=5 EXTRA="--heads 3 --attention-backend cudnn": launch video; finish
#   video (alone on the GPU; 3 heads is now the config's default, and cuDNN first measured no
#   faster than PyTorch's own order: scripts/bench_video_train.py).
set -euo pipefail
phase=${1:?classifiers, launch, finish or all}
shift
if [ "$phase" = launch ] || [ "$phase" = finish ]; then
  model=${1:?image or video}
  shift
fi
W=${1:?work dir}
OUT=${2:-$W/out}
MINUTES=${MINUTES:-19}
EXTRA=${EXTRA:-}            # e.g. EXTRA=--toy for a CPU smoke run
SAMPLES=${SAMPLES:-96}
EXTRA_EVAL=${EXTRA_EVAL:-}  # e.g. EXTRA_EVAL="--steps 2"
mkdir -p "$W" "$OUT"

classifiers() {
  python3 -m ditaccel testbed train classifiers --out "$W" --minutes 4 $EXTRA >"$W/classifiers.log" 2>&1
  tar czf "$OUT/classifiers.tgz" -C "$W" image_classifier video_classifier
}
train() {  # model, then "detached" or "here"
  local cmd=(python3 -m ditaccel testbed train "$1" --out "$W/$1" --minutes "$MINUTES" $EXTRA)
  if [ -d "$W/$1_classifier" ]; then  # a learning curve in train_info.json, printed to the log
    cmd+=(--probe-every "${PROBE_EVERY:-3}" --probe-classifier "$W/$1_classifier")
  fi
  if [ "$2" = detached ]; then
    setsid nohup "${cmd[@]}" >"$W/$1.log" 2>&1 </dev/null &
  else
    "${cmd[@]}" >"$W/$1.log" 2>&1
  fi
}
finish() {
  while pgrep -f "ditaccel testbed train $1 " >/dev/null; do sleep 5; done
  tar czf "$OUT/$1.tgz" -C "$W" "$1"
  python3 -m ditaccel eval --model "$1" --method dense --weights "$W" --samples "$SAMPLES" $EXTRA_EVAL \
    --json "$OUT/eval_$1.json" --samples-png "$OUT/samples_$1.png"
}

case $phase in
classifiers) classifiers ;;
launch) train "$model" detached ;;
finish) finish "$model" ;;
all) classifiers; for m in image video; do train "$m" here; finish "$m"; done ;;
*) echo "phase must be classifiers, launch, finish or all" >&2; exit 2 ;;
esac
