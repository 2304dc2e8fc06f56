#!/usr/bin/env bash
# Everything one GPU lease should run for issues #13 and #14, in one call from the repository root of a GPU
# machine whose python3 has torch/torchvision/triton but no pycocotools (carry .whl/, fetched here with
# `bash scripts/gpu_tests.sh fetch`). About 12-13 minutes on one H200:
#   1. the cuda-marked tests (scripts/gpu_tests.sh run; also installs pycocotools under /tmp/megdet-site)
#   2. scripts/gpu_bench.sh: train_step vs torchvision (profiled), trainer throughput, loader, sublinear
#      memory, PrRoIPool (about 4 minutes)
#   3. the large-batch study on the GPU: batches 8, 32, 64, 128 and six ablations at 128, 10 runs at once,
#      each stopped after 6 minutes (benchmarks/large_batch_study.py --device cuda)
# $OUT receives 4 files (the limit on what comes back is 8): the three logs and results.tgz (every JSON and
# PNG). STUDY_LIMIT / BENCH=0 / STUDY=0 shorten it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
WORK=/tmp/gpu_session_work
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
say() { echo "[gpu_session $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/session.log"; }

timeout 180 bash scripts/gpu_tests.sh run > "$WORK/cuda_tests.log" 2>&1
say "cuda tests: exit $?; $(tail -1 "$WORK/cuda_tests.log")"
if [ "${BENCH:-1}" = 1 ]; then
  OUT="$WORK/bench" bash scripts/gpu_bench.sh > /dev/null 2>&1
  say "gpu_bench: exit $?"
fi
if [ "${STUDY:-1}" = 1 ]; then
  export PYTHONPATH="/tmp/megdet-site:$PWD"
  timeout "${STUDY_LIMIT:-450}" python3 benchmarks/large_batch_study.py --device cuda --parallel 10 \
    --batches 8,32,64,128 --ablations no_warmup,linear_lr,bn_groups_2,frozen_bn,lamb,scale_betas \
    --run-timeout 6 --out "$WORK/study_runs" --json "$WORK/study/large_batch_study.json" > "$WORK/study.log" 2>&1
  say "large_batch_study: exit $?"
fi
cp "$WORK/cuda_tests.log" "$OUT/" 2>/dev/null
cat "$WORK/study.log" "$WORK/bench/gpu_bench.log" > "$OUT/bench_and_study.log" 2>/dev/null
# study_result.json of every finished run too: they survive a study stopped before its report
(cd "$WORK" && find . -maxdepth 3 \( -name '*.json' -o -name '*.png' \) \( -not -path './study_runs/*' \
  -o -name study_result.json \) -print0 | xargs -0 tar czf "$OUT/results.tgz")
say "done; $(ls "$OUT" | tr '\n' ' ')"
