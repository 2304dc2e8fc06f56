# Every target creates .venv with pip when it is missing and installs megdet with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned here only to take the wheels this machine already has on disk;
# pyproject.toml declares ranges.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-cuda lint demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m ruff check megdet tests benchmarks
	$(PY) -m pytest -q

# Only the tests marked cuda (skipped on machines without CUDA devices, such as CI's).
CUDA_PY ?= $(PY)
test-cuda:
	$(CUDA_PY) -m pytest -q -m cuda

lint: $(VENV)/.installed
	$(PY) -m ruff check megdet tests benchmarks

demo: $(VENV)/.installed
	$(VENV)/bin/megdet demo --out runs/demo

clean:
	rm -rf runs build *.egg-info
