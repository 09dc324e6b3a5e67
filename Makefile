# The two commands a new user needs: `make demo` and `make test`. Each creates .venv,
# installs the pinned requirements and the package, and does nothing more on a second run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pfa_kernels-installed

# Extension builds (a later csrc/ extension): keep them within a 2-core machine.
export MAX_JOBS ?= 2
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(PY) -m pfa_kernels.demo

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest -q tests --durations=15

# A quick CPU run (several minutes) of the headline tables: ResNet-18 training step vs BP for explicit and
# projected PFA at r = 1, 10, 100, and every distinct ResNet-18 layer shape at r = 10. Results (JSON lines,
# markdown tables, plots) go to benchmarks/results/.
bench: setup
	$(PY) benchmarks/bench_model.py --models resnet18 --batch 16 --expand-ratios 1,10,100 \
		--impls projected,explicit --repeats 3
	$(PY) benchmarks/bench_layers.py --models resnet18 --batch 16 --expand-ratio 10 \
		--impls bp,reference,explicit-auto,projected-auto --rounds 3

clean:
	rm -rf $(VENV) build *.egg-info demo_output
