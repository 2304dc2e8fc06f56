#!/usr/bin/env bash
# The CUDA-marked tests (make test-cuda) on a GPU machine whose python3 already has torch, torchvision,
# tensorboard, tqdm, matplotlib, PyYAML, Pillow and pytest but not pycocotools (this project's lent
# GPU machines; see README, Development).
#   here (with package-registry access):  bash scripts/gpu_tests.sh fetch   -> .whl/pycocotools-*.whl
#   there (no network), from the repo root: bash scripts/gpu_tests.sh run   (carry .whl along)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  fetch)
    PY="${PY:-python3}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl pycocotools
    ls .whl ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/megdet-site .whl/*.whl
    export PYTHONPATH="/tmp/megdet-site:$PWD"
    nvidia-smi -L || true
    python3 -c "import torch; print('torch', torch.__version__, 'cuda devices:', torch.cuda.device_count())"
    python3 -m pytest -q -m cuda -p no:cacheprovider ;;
  *)
    echo "usage: bash scripts/gpu_tests.sh fetch|run" >&2; exit 2 ;;
esac
