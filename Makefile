# Two commands do everything on a fresh machine:
#   make run    set up .venv and run the main job on the built-in default
#   make test   set up .venv and run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-all lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is the pinned build; on a CPU-only box pip takes the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,runtime,ray]"
	# Compile the numba kernels once (cached beside their sources): a first serving run or
	# benchmark then does not spend ~30 s compiling them.
	$(PY) benchmarks/bench_serving.py --requests 300 > /dev/null
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lina-sim reproduce

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_network.py

clean:
	rm -rf $(VENV) build *.egg-info
