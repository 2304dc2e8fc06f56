#!/usr/bin/env bash
# Everything one GPU lease should run for issues #13 and #14, in one call from the repository root of a GPU
# machine whose python3 has torch/torchvision/triton but no pycocotools (carry .whl/, fetched here with
# `bash scripts/gpu_tests.sh fetch`). At most about 9.5 minutes on one H200, sized for a 15-minute lease:
#   1. at once, side by side (neither is timed against anything else):
#      a. the large-batch study's runs at the largest batch, 128 (benchmarks/large_batch_study.py --device
#         cuda --batches 128): the default policy and the ablations, all at once, STUDY_LIMIT seconds (230)
#      b. the cuda-marked tests (scripts/gpu_tests.sh run; also installs pycocotools under /tmp/megdet-site)
#   2. then, on the idle GPU, scripts/gpu_bench.sh: train_step vs torchvision (profiled), the prroi step,
#      trainer throughput, loader, sublinear memory, PrRoIPool (at most 5 minutes)
# $OUT receives 4 files (the limit on what comes back is 8): the three logs and results.tgz (every JSON and
# PNG). STUDY_LIMIT / BENCH=0 / STUDY=0 shorten it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
WORK=/tmp/gpu_session_work
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
say() { echo "[gpu_session $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/session.log"; }

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/megdet-site .whl/*.whl \
  > "$WORK/pip.log" 2>&1 || say "pycocotools wheel: $(tail -1 "$WORK/pip.log")"
export PYTHONPATH="/tmp/megdet-site:$PWD" PYTHONUNBUFFERED=1
if [ "${STUDY:-1}" = 1 ]; then
  # 5 runs of 125 iterations at batch 128; each records study_result.json when it finishes, so that a study
  # stopped at STUDY_LIMIT still leaves the runs that finished.
  timeout --kill-after=15 "${STUDY_LIMIT:-230}" python3 benchmarks/large_batch_study.py --device cuda \
    --parallel 5 --batches 128 --ablations no_warmup,no_lr_scaling,bn_groups_2,frozen_bn \
    --run-timeout "${RUN_TIMEOUT:-3.6}" --out "$WORK/study_runs" --json "$WORK/study/large_batch_study.json" \
    > "$WORK/study.log" 2>&1 &
  STUDY_PID=$!
fi
timeout 150 bash scripts/gpu_tests.sh run > "$WORK/cuda_tests.log" 2>&1
say "cuda tests: exit $?; $(tail -1 "$WORK/cuda_tests.log")"
if [ "${STUDY:-1}" = 1 ]; then
  wait "$STUDY_PID"
  say "large_batch_study: exit $?"
  pkill -9 -f study_runs 2>/dev/null && say "killed runs left over by the study"  # the bench needs an idle GPU
fi
if [ "${BENCH:-1}" = 1 ]; then
  OUT="$WORK/bench" bash scripts/gpu_bench.sh > /dev/null 2>&1
  say "gpu_bench: exit $?"
fi
cp "$WORK/cuda_tests.log" "$OUT/" 2>/dev/null
cat "$WORK/study.log" "$WORK/bench/gpu_bench.log" > "$OUT/bench_and_study.log" 2>/dev/null
# study_result.json of every finished run too: they survive a study stopped before its report
(cd "$WORK" && find . -maxdepth 3 \( -name '*.json' -o -name '*.png' \) \( -not -path './study_runs/*' \
  -o -name study_result.json \) -print0 | xargs -0 tar czf "$OUT/results.tgz")
say "done; $(ls "$OUT" | tr '\n' ' ')"
