#!/usr/bin/env bash
# Issue #14's GPU benchmarks in one go, from the repository root of a GPU machine whose python3 has
# torch, torchvision, matplotlib and tensorboard (no network needed):
#   OUT=/some/dir bash scripts/gpu_bench.sh          # at most about 5 minutes on one H200
#   DEVICE=cpu PY=.venv/bin/python OUT=/tmp/gb bash scripts/gpu_bench.sh   # tiny CPU stand-in: the script runs end to end
# Parts, in order of importance, each under `timeout` so that one failing or hanging does not stop the
# rest (its exit code is logged):
#   1. benchmarks/train_step.py: faster,mask x batch 2,8 x fp32,bf16 at 800x1216, ours vs torchvision, --profile;
#      then Mask R-CNN batch 8 bf16 with the prroi pooler against the roialign one (ours_prroi vs ours)
#   2. benchmarks/trainer_throughput.py: `megdet train` on synthetic data vs the step benchmark (goal >= 0.9)
#   3. benchmarks/data_loader.py: does the trainer's loader keep up with the step's images/s (2, 4, 8 workers)?
#   4. benchmarks/sublinear_memory.py --device cuda
#   5. benchmarks/prroi_pool.py --device cuda
# Parts 2 and 3 read COCO files, which needs pycocotools: if python3 lacks it, a wheel in .whl/ (fetched
# here with `bash scripts/gpu_tests.sh fetch`; carry .whl along) is installed under /tmp/megdet-site;
# without either they are skipped. $OUT receives at most 7 files: gpu_bench.log (every part's output) and
# one JSON per part. BENCH_LIMITS overrides the parts' time limits (seconds, in the order
# train_step, trainer_throughput, data_loader, sublinear_memory, prroi_pool, train_step_prroi).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
PY="${PY:-python3}"
OUT="${OUT:-/tmp/gpu_bench}"
WORK="${WORK:-/tmp/megdet_gpu_bench}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_bench.log"
: > "$LOG"
export PYTHONPATH="/tmp/megdet-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

say() { echo "[gpu_bench $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

part() {  # name, timeout seconds, command...: runs it with its output in the log, records its exit code
  local name="$1" limit="$2"; shift 2
  say "== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  say "== $name: exit $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
}

say "device $DEVICE, python $PY, out $OUT"
{ nvidia-smi -L 2>/dev/null || true
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"; } >> "$LOG" 2>&1

HAVE_COCO=1
if ! "$PY" -c "import pycocotools" 2>/dev/null; then
  if ls .whl/pycocotools-*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/megdet-site .whl/pycocotools-*.whl >> "$LOG" 2>&1
  fi
  "$PY" -c "import pycocotools" 2>/dev/null || { HAVE_COCO=0; say "no pycocotools and no .whl/ wheel: parts 2 and 3 skipped"; }
fi

if [ "$DEVICE" = cpu ]; then  # the stand-in: tiny sizes, one step each, R50 kept so the comparison stays like for like
  SIZE=64x96; BATCH=1
  TS_ARGS=(--device cpu --quick --size $SIZE --batch $BATCH --model faster,mask --iters 1 --bf16-steps 1
           --profile --profile-steps 1 --threads 1)
  TT_ARGS=(--device cpu --iters 4 --log-period 2 --workers 1 --num-train 8 --image-size 96)
  DL_ARGS=(--workers 0 1 --batches 4 --repeats 1 --quick)
  sed -e 's/backbone: resnet50/backbone: resnet10/' -e 's/fpn_channels: 256/fpn_channels: 32/' \
      -e 's/box_head_dim: 1024/box_head_dim: 64/' -e 's/batch_size_per_image: 512/batch_size_per_image: 64/' \
      configs/coco_faster_r50_fpn.yaml > "$WORK/tiny_faster.yaml"
  SL_ARGS=(--device cpu --quick --no-budget --no-torchvision --config "$WORK/tiny_faster.yaml")
  PR_ARGS=(--device cpu --quick --sizes 256x256 --rois-per-image 64)
  LIMIT=(600 300 120 300 300 300)
else
  SIZE=800x1216; BATCH=8
  TS_ARGS=(--device "$DEVICE" --profile)
  TT_ARGS=(--device "$DEVICE" --iters 40 --log-period 10 --workers 8 --num-train 96 --image-size 640 --timeout 42)
  DL_ARGS=(--workers 4 8 --batches 16 --repeats 1)
  SL_ARGS=(--device "$DEVICE" --images 4)
  PR_ARGS=(--device "$DEVICE")
  LIMIT=(${BENCH_LIMITS:-130 50 20 30 30 40})
fi
H=${SIZE%x*}; W=${SIZE#*x}

part train_step "${LIMIT[0]}" "$PY" benchmarks/train_step.py "${TS_ARGS[@]}" --out "$OUT/train_step_$DEVICE.json"
# The Precise RoI Pooling step against the RoIAlign step (same weights), Mask R-CNN at the largest batch, bf16.
part train_step_prroi "${LIMIT[5]}" "$PY" benchmarks/train_step.py "${TS_ARGS[@]}" --model mask --batch $BATCH \
  --precision bf16 --impls ours,ours_prroi --out "$OUT/train_step_prroi_$DEVICE.json"

# The step benchmark's rate at the trainer's settings (ours, Faster R-CNN, fp32): the target of parts 2 and 3.
TARGET=$("$PY" - "$OUT/train_step_$DEVICE.json" "$BATCH" "$H" "$W" <<'EOF' 2>/dev/null
import json, sys
path, batch, h, w = sys.argv[1], *map(int, sys.argv[2:])
for c in json.load(open(path))["configs"]:
    if (c["model"], c["batch"], c["height"], c["width"]) == ("faster", batch, h, w):
        print(next(r["images_per_s"] for r in c["rows"] if (r["impl"], r["precision"]) == ("ours", "fp32")))
EOF
)
say "step benchmark, ours faster fp32, batch $BATCH at $SIZE: ${TARGET:-unknown} images/s"

if [ "$HAVE_COCO" = 1 ]; then
  REF=(); [ -n "$TARGET" ] && REF=(--reference "$OUT/train_step_$DEVICE.json")
  part trainer_throughput "${LIMIT[1]}" "$PY" benchmarks/trainer_throughput.py "${TT_ARGS[@]}" --batch $BATCH \
    --size $SIZE --work-dir "$WORK" ${REF[@]+"${REF[@]}"} --out "$OUT/trainer_throughput_$DEVICE.json"
  DATA=$(ls -d "$WORK"/synth_* 2>/dev/null | head -1)
  if [ -n "$DATA" ]; then
    TGT=(); [ -n "$TARGET" ] && TGT=(--target-images-per-s "$TARGET")
    part data_loader "${LIMIT[2]}" "$PY" benchmarks/data_loader.py --data-dir "$DATA" --trainer-only "${DL_ARGS[@]}" \
      ${TGT[@]+"${TGT[@]}"} --out "$OUT/data_loader_$DEVICE.json" \
      --set "data.min_size_train=[$H]" "data.max_size_train=$W" "data.images_per_device=$BATCH" model.mask_on=false
  else
    say "no synthetic data in $WORK: data_loader skipped"
  fi
fi

part sublinear_memory "${LIMIT[3]}" "$PY" benchmarks/sublinear_memory.py "${SL_ARGS[@]}" --results-dir "$WORK/sublinear"
cp "$WORK"/sublinear/sublinear_memory*.json "$OUT/" 2>/dev/null

part prroi_pool "${LIMIT[4]}" "$PY" benchmarks/prroi_pool.py "${PR_ARGS[@]}" --results-dir "$WORK/prroi"
cp "$WORK"/prroi/prroi_pool*.json "$OUT/" 2>/dev/null

say "done; $OUT holds: $(cd "$OUT" && ls | tr '\n' ' ')"
# The headline lines again at the end of the log and on stdout.
grep -E "^(model|faster|mask) |^\(of peak|^prroi step|^ratio |^megdet train \(exit|^trainer's loader|^fewest workers|: total <= 50%|^Goal" \
  "$LOG" > "$WORK/summary.txt"
{ echo "== summary"; cat "$WORK/summary.txt"; } | tee -a "$LOG"
