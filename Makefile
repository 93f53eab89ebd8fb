# fastpeft: the whole contract on a fresh machine is `make demo` and `make test`.
#
#   make deps         create $(VENV) with torch and the test/bench tools
#   make build        pip install -e . (compiles fastpeft._C; CUDA for sm_80/sm_90 when nvcc exists)
#   make test         build, then the CPU test suite (Triton kernels run in the interpreter)
#   make demo         build, then `python -m fastpeft demo`
#   make cuda-check   the CUDA sources compile for sm_80 and sm_90 (no GPU needed)
#   make triton-check Triton kernels compile ahead of time for real GPUs (no GPU needed)
#   make test-gpu     on a CUDA machine: compiled Triton kernels + CUDA extension tests (pytest -m gpu)
#   make wheel        dist/fastpeft-<ver>+cu<CUDA>torch<A.B>-cpXY-cpXY-linux_x86_64.whl for the installed
#                     torch and nvcc, built from a clean copy of the tree; BACKEND=none: the portable
#                     pure-Python wheel (no suffix); BACKEND=cpu: +cputorch<A.B>
#   make sdist        dist/fastpeft-<ver>.tar.gz (csrc/ and kernels/ included; builds like the tree)
#   make wheel-check  wheel + sdist, then tools/wheel_check.py: fresh venv install, imports, CPU ops,
#                     cubins per arch, mismatch fallback, a wheel built from the sdist
#   make clean        build outputs (keeps $(VENV)); `make distclean` also removes $(VENV)

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# nvcc on PATH may be a wrapper outside the toolkit (from which torch would infer a CUDA_HOME
# without headers): point at the real toolkit unless told otherwise.
ifeq ($(origin CUDA_HOME),undefined)
  ifneq ($(wildcard /usr/local/cuda),)
    CUDA_HOME := /usr/local/cuda
  endif
endif
ifdef CUDA_HOME
  export CUDA_HOME
endif
export MAX_JOBS ?= 2

FASTPEFT_BUILD_BACKEND ?= auto
export FASTPEFT_BUILD_BACKEND

STAMPS := .stamps
CSRC := $(shell find csrc -type f 2>/dev/null)

# The build stamp must also go stale when the requested backend or arch list changes, not only
# when files do: record them in a file that is rewritten only when its content changes.
BUILD_CONFIG := $(STAMPS)/build-config
BUILD_CONFIG_TEXT := backend=$(FASTPEFT_BUILD_BACKEND) archs=$(TORCH_CUDA_ARCH_LIST) cuda_home=$(CUDA_HOME)
$(shell mkdir -p $(STAMPS); echo '$(BUILD_CONFIG_TEXT)' | cmp -s - $(BUILD_CONFIG) || echo '$(BUILD_CONFIG_TEXT)' > $(BUILD_CONFIG))

# cuobjdump ships with full CUDA toolkits; minimal ones (like the build machines') lack it,
# but Triton bundles one.
CUOBJDUMP ?= $(firstword $(wildcard $(CUDA_HOME)/bin/cuobjdump) \
    $(shell $(PY) -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null))
CUDA_CHECK_DIR := build/cuda-check

.PHONY: deps build test test-gpu demo cuda-check triton-check clean distclean

deps: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: Makefile pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors pybind11 ninja pytest pytest-benchmark rich matplotlib scikit-learn hypothesis
	touch $@

build: $(STAMPS)/build

$(STAMPS)/build: $(VENV)/.deps-stamp $(CSRC) setup.py fastpeft/version.py pyproject.toml $(BUILD_CONFIG)
	@# --no-build-isolation: compile against the torch in $(VENV), not a fresh copy.
	$(PIP) install -e . --no-build-isolation
	touch $@

test: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The `gpu` tests (tests/gpu and the kernels' GPU cases) with compiled, not interpreted, kernels.
# On a machine without a venv-managed torch, tools/gpu_session.sh does the same with its python3.
test-gpu: build
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu tests

demo: build
	$(PY) -m fastpeft demo

# With a CUDA build, the installed .so must carry sm_80 and sm_90 cubins. Otherwise (CPU-only
# torch, or FASTPEFT_BUILD_BACKEND=cpu|none) compile csrc/cuda/*.cu directly, so CUDA code is
# still proven to compile for both targets.
cuda-check: build
	@test -x "$(CUOBJDUMP)" || { echo "cuda-check: no cuobjdump (set CUOBJDUMP=...)"; exit 1; }
	@backend=$$($(PY) -c "import json; print(json.load(open('fastpeft/_build_info.json'))['backend'])"); \
	if [ "$$backend" = cuda ]; then \
	  so=$$(ls fastpeft/_C*.so) && elfs=$$($(CUOBJDUMP) --list-elf $$so) || exit 1; \
	  echo "$$elfs"; \
	  for sm in sm_80 sm_90; do \
	    echo "$$elfs" | grep -q "\.$$sm\.cubin" || { echo "cuda-check: FAIL: no $$sm cubin in $$so"; exit 1; }; \
	  done; \
	  echo "cuda-check: OK: $$so has sm_80 and sm_90 cubins"; \
	else \
	  echo "cuda-check: build backend is '$$backend'; compiling csrc/cuda/*.cu for sm_80 and sm_90 into $(CUDA_CHECK_DIR)/"; \
	  test -x "$(CUDA_HOME)/bin/nvcc" || { echo "cuda-check: FAIL: no nvcc at $(CUDA_HOME)/bin/nvcc"; exit 1; }; \
	  mkdir -p $(CUDA_CHECK_DIR); \
	  flags=$$($(PY) -c "from torch.utils import cpp_extension as c; import sysconfig; \
	    print(' '.join(['-I' + p for p in c.include_paths('cuda') + [sysconfig.get_paths()['include']]] + c.COMMON_NVCC_FLAGS))") || exit 1; \
	  for cu in csrc/cuda/*.cu; do \
	    obj=$(CUDA_CHECK_DIR)/$$(basename $$cu .cu).o; \
	    $(CUDA_HOME)/bin/nvcc -c $$cu -o $$obj -std=c++20 -O3 -Xcompiler -fPIC -DFASTPEFT_WITH_CUDA -Icsrc/include $$flags \
	      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 || exit 1; \
	    elfs=$$($(CUOBJDUMP) --list-elf $$obj) || exit 1; \
	    for sm in sm_80 sm_90; do \
	      echo "$$elfs" | grep -q "\.$$sm\.cubin" || { echo "cuda-check: FAIL: no $$sm cubin in $$obj"; exit 1; }; \
	    done; \
	    echo "cuda-check: OK: $$cu compiles for sm_80 and sm_90"; \
	  done; \
	fi

# Compiles every shipped Triton kernel config for sm_80/sm_90 and checks shared memory and
# spills (see kernels/aot.py once it exists).
triton-check: build
	@if $(PY) -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('fastpeft.kernels.aot') else 1)" 2>/dev/null; then \
	  $(PY) -m fastpeft.kernels.aot; \
	else \
	  echo "triton-check: no fastpeft.kernels.aot yet; nothing to check"; \
	fi

# --- wheels (see docs/building.md "Wheels") -------------------------------------------------------------
# Built from a copy of the tracked + untracked-but-not-ignored files in build/wheel-src, so no
# in-place fastpeft/_C*.so, _build_info.json or stale build/ of the editable install can leak in.
BACKEND ?= cuda
WHEEL_SRC := build/wheel-src
WHEEL_CHECK_DEPS ?= wheel sdist
# `make deps` sets up the default venv; another VENV (e.g. one with a torch for another CUDA,
# docs/building.md "Wheels") is the caller's own and is used as it is.
WHEEL_VENV := $(if $(filter .venv,$(VENV)),$(VENV)/.deps-stamp,$(PY))
ifdef NVCC_THREADS
  export NVCC_THREADS
endif
ifdef TORCH_CUDA_ARCH_LIST
  export TORCH_CUDA_ARCH_LIST
endif
# The commit a wheel is built from (+"-dirty" when tracked files differ from it).
GIT_SHA = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(shell git diff --quiet HEAD -- 2>/dev/null || echo -dirty)
COPY_TREE = rm -rf $(1) && mkdir -p $(1) && git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C $(1)

.PHONY: wheel sdist wheel-check

wheel: $(WHEEL_VENV)
	@# Preflight: names the wheel, and for BACKEND=cuda fails here (before compiling anything)
	@# without nvcc or with an nvcc whose major version differs from torch's CUDA.
	@local=$$($(PY) tools/wheel_tag.py local $(BACKEND)) || exit 1; \
	name=$$($(PY) tools/wheel_tag.py wheel-name $(BACKEND)) || exit 1; \
	echo "make wheel: BACKEND=$(BACKEND) archs=$${TORCH_CUDA_ARCH_LIST:-default} MAX_JOBS=$(MAX_JOBS) NVCC_THREADS=$${NVCC_THREADS:-unset} -> $$name"; \
	$(call COPY_TREE,$(WHEEL_SRC)) && rm -f $$name && \
	start=$$(date +%s) && \
	( cd $(WHEEL_SRC) && FASTPEFT_BUILD_BACKEND=$(BACKEND) FASTPEFT_LOCAL_VERSION=$$local FASTPEFT_GIT_SHA=$(GIT_SHA) \
	  $(abspath $(PY)) -m pip wheel . --no-build-isolation --no-deps -w $(CURDIR)/dist ) && \
	test -f $$name || { echo "make wheel: FAIL: expected $$name"; exit 1; }; \
	echo "make wheel: built $$name in $$(( $$(date +%s) - start ))s"

sdist: $(WHEEL_VENV)
	@$(call COPY_TREE,build/sdist-src) && echo $(GIT_SHA) > build/sdist-src/GIT_SHA && \
	( cd build/sdist-src && FASTPEFT_BUILD_BACKEND=none \
	  $(abspath $(PY)) -c "import setuptools.build_meta as b; print('make sdist: built dist/' + b.build_sdist('$(CURDIR)/dist'))" )

# Installs the wheel into a fresh venv outside the tree and checks it (tools/wheel_check.py).
# `make wheel-check WHEEL_CHECK_DEPS=` checks the existing dist/ files without rebuilding;
# WHEEL_CHECK_SDIST= skips the sdist part (which builds a CPU wheel from the sdist).
WHEEL_CHECK_SDIST ?= 1
wheel-check: $(WHEEL_CHECK_DEPS)
	@$(PY) tools/wheel_check.py --wheel $$($(PY) tools/wheel_tag.py wheel-name $(BACKEND)) --cuobjdump "$(CUOBJDUMP)" \
	  $(if $(WHEEL_CHECK_SDIST),--sdist dist/fastpeft-$$($(PY) tools/wheel_tag.py version).tar.gz)

clean:
	rm -rf build dist *.egg-info $(STAMPS) fastpeft/_C*.so fastpeft/_build_info.json .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# --- benchmarks (bench/, pytest-benchmark; see README "Benchmarks") -------------------------
#   make bench        the full suite on this machine (~18 min on 2 idle CPU cores): writes
#                     bench/results/<device>-<date>.{json,md,png} and bench/results/LATEST.md.
#                     GPU setting of shared/guides/performance.md:
#                     make bench BENCH_ARGS="--bench-model vit_base_patch16_224 --bench-batch 128 \
#                       --bench-dtype bf16 --bench-device cuda --bench-compile all --bench-op-sizes 128x197x768"
#                     baseline memory rows (ViT-B/16, batch 8, fp32, CPU):
#                     make bench BENCH_ARGS="--bench-model vit_base_patch16_224 --bench-rounds 3 -k 'e2e and train'"
#   make bench-smoke  every contender's code path on a tiny model, untimed (tests/test_bench_smoke.py runs it too)
#   make bench-host   host-overhead mode: ViT-Ti, 5 tokens, batch 1, 1 thread, Triton launches stubbed
#                     -> bench/results/<device>-<date>-host_overhead.{json,md}
BENCH_ARGS ?=
.PHONY: bench bench-smoke bench-host

$(VENV)/.bench-deps-stamp: $(VENV)/.deps-stamp
	$(PIP) install peft matplotlib
	touch $@

bench: build $(VENV)/.bench-deps-stamp
	$(PY) -m pytest bench -p no:cacheprovider --benchmark-columns=median,iqr,rounds --bench-save bench/results $(BENCH_ARGS)
	$(PY) -m bench.report --latest bench/results --readme bench/results/LATEST.md

bench-smoke: build
	$(PY) -m bench.smoke

bench-host: build
	$(PY) -m pytest bench -p no:cacheprovider --bench-host --bench-save bench/results $(BENCH_ARGS)
