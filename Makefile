# Fresh machine: `make demo` (the main job) or `make test` (the test-suite). Both create .venv,
# install the pinned requirements and build epic_ext._C (C++ CPU kernels, plus the CUDA kernels
# when torch is a CUDA build and nvcc matches it; EPIC_EXT_CUDA=0/1 overrides).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
export EPIC_EXT_CUDA ?= auto

KERNEL_SOURCES := $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh csrc/include/epic/*.h python/*.cpp) setup.py
CMAKE_DIR := build/cmake

.PHONY: all build test test-python test-cpp test-asan test-eval test-gpu gpu-check demo demo-quick bench clean

all: build

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(KERNEL_SOURCES)
	$(PY) -m pip install -q -e . --no-build-isolation
	@$(PY) -m epic_ext.cuda_build  # loud when a GPU is visible but the CUDA kernels were not built
	touch $@

build: $(VENV)/.built

$(CMAKE_DIR)/CMakeCache.txt: $(VENV)/.deps CMakeLists.txt
	cmake -S . -B $(CMAKE_DIR) -DPython3_EXECUTABLE=$(abspath $(PY)) > /dev/null

test-cpp: $(CMAKE_DIR)/CMakeCache.txt
	cmake --build $(CMAKE_DIR) -j $(MAX_JOBS)
	ctest --test-dir $(CMAKE_DIR) --output-on-failure

test-asan: $(VENV)/.deps
	cmake -S . -B build/asan -DPython3_EXECUTABLE=$(abspath $(PY)) -DEPIC_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug > /dev/null
	cmake --build build/asan -j $(MAX_JOBS)
	ASAN_OPTIONS=detect_leaks=0 ctest --test-dir build/asan --output-on-failure

test-python: build
	TRITON_INTERPRET=1 $(PY) -m pytest tests

test: test-cpp test-python

# The evaluation harnesses end to end (tests/eval): installs the `eval` extra (lmms-eval, ~1.3 GB,
# requirements-eval.txt) into .venv first. CI runs it after `make test`.
$(VENV)/.eval: $(VENV)/.deps requirements-eval.txt
	$(PY) -m pip install -q -r requirements-eval.txt
	touch $@

test-eval: build $(VENV)/.eval
	$(PY) -m pytest tests/eval

# GPU machine. test-gpu: the kernel tests with the CUDA kernels and compiled Triton (no
# TRITON_INTERPRET) plus the GPU-sized tests/gpu; it builds first when there is a .venv, else it
# uses the machine's python3 and the extension built in place (gpu-check builds it).
# gpu-check: build with EPIC_EXT_CUDA=1, test-gpu, the GPU goals, benchmarks at GPU sizes,
# compute-sanitizer, one summary (benchmarks/gpu_check.py; README "GPU check"). Without a GPU both
# say so; gpu-check then lists what it would run and exits 0.
GPU_PY = $(if $(wildcard $(VENV)/bin/python),$(PY),$(PYTHON))
GPU_TESTS = $(shell $(GPU_PY) -c "from benchmarks.gpu_check import GPU_TEST_PATHS as p; print(*p)")

test-gpu:
	@$(GPU_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA device is visible (make test runs the CPU suite)')"
	$(if $(wildcard $(VENV)/.deps),$(MAKE) build)
	EPIC_EXT_TEST_GPU=1 $(GPU_PY) -m pytest $(GPU_TESTS) $(PYTEST_ARGS)

gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

demo: build
	$(VENV)/bin/epic-ext demo --out runs/demo

demo-quick: build
	$(VENV)/bin/epic-ext demo --quick --out runs/demo-quick

bench: build
	$(VENV)/bin/epic-ext bench

clean:
	rm -rf build $(VENV) *.egg-info epic_ext/_C*.so
