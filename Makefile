# The two commands a new user needs: `make demo` and `make test`. Each creates .venv,
# installs the pinned requirements and the package, and does nothing more on a second run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pfa_kernels-installed

# Extension builds (a later csrc/ extension): keep them within a 2-core machine.
export MAX_JOBS ?= 2
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX

.PHONY: setup demo test lint bench gpu-check clean

EXTENSION_STAMP := $(VENV)/.pfa_kernels-extension-built
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)

setup: $(STAMP) $(EXTENSION_STAMP)

$(STAMP): requirements.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	PFA_KERNELS_NO_EXTENSION=1 $(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

# The compiled extension (pfa_kernels/_C*.so), built in place; ninja keeps build/ so only changed sources
# recompile. About 1.5 minutes from scratch on 2 cores (the CUDA file for sm_80 and sm_90 is most of it).
$(EXTENSION_STAMP): $(STAMP) $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	touch $@

demo: setup
	$(PY) -m pfa_kernels.demo

lint: setup
	$(VENV)/bin/ruff check .

# Two pytest processes: Triton reads TRITON_INTERPRET when it defines a kernel, so the interpreter tests
# (tests/test_triton.py) run in their own process; the main one compiles the kernels ahead of time instead.
test: setup lint
	$(PY) -m pytest -q tests --durations=15
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_triton.py --durations=5

# A quick CPU run of the headline tables (about 10 minutes on 2 cores, most of it the explicit r = 100 model,
# whose step is ~16x BP's): ResNet-18 training step vs BP for explicit and projected PFA at r = 1, 10, 100,
# and every distinct ResNet-18 layer shape at r = 10. Results (JSON lines, markdown tables, plots) go to
# benchmarks/results/. The full per-layer run: python benchmarks/bench_layers.py (see its --help).
bench: setup
	$(PY) benchmarks/bench_model.py --models resnet18 --batch 16 --expand-ratios 1,10,100 \
		--impls projected,explicit --repeats 3
	$(PY) benchmarks/bench_layers.py --models resnet18 --batch 16 --expand-ratio 10 \
		--impls bp,explicit-auto,projected-auto --rounds 3

# The first thing to run on a GPU: the CUDA subset of the tests (pytest -m cuda), then per kernel x dtype x ResNet-50/ViT
# shape the error against the literal algorithm, the time against PyTorch and backend="auto"'s choice, written to
# benchmarks/results/check_<device>.{jsonl,md}. Without a GPU it says so and reports the CPU kernels (about 2 minutes).
gpu-check: setup
	$(PY) -m pfa_kernels.check

clean:
	rm -rf $(VENV) build *.egg-info demo_output pfa_kernels/_C*.so
