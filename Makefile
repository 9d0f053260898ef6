# Two commands on a fresh machine:
#   make test    set up .venv (torch, the package with its C++/CUDA extension) and run the tests
#   make bench   the same set-up, then the benchmark (`vitfast bench`)
# and two checks CI does not run:
#   make test-matrix   the numerics-sensitive tests under emulated hosts (tests/host_matrix.py;
#                      MATRIX_ARGS="--full" for all 27 cells)
#   make sm90-compile  the Triton kernels compiled for sm_90 as the JIT would, under this triton and
#                      under the GPU image's (TRITON_GPU_VERSION), tables of registers/spills/smem
# Re-running is quick: torch is installed once, the extension is rebuilt only when csrc/ or
# the build files changed.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The torch build to install. The default CUDA 13.0 build is what lets the .cu sources
# compile on a machine without a GPU; override for another CUDA or a CPU-only build, e.g.
#   make test TORCH_SPEC="torch==2.11.0 torchvision==0.26.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
MATRIX_ARGS ?=
# the triton of the GPU machine's image, installed beside the venv's for make sm90-compile
TRITON_GPU_VERSION ?= 3.6.0
SM90_CASES ?=  # empty: every case the ops declare (OpSpec.sm90)

VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check -q
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: test bench test-matrix sm90-compile $(VENV) clean info FORCE
.DEFAULT_GOAL := test

# torch, installed once per torch spec (the stamp holds the spec it was installed for)
$(VENV)/.torch-stamp: FORCE
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH_SPEC) $(TORCH_INDEX)" ]; then \
	  echo "installing $(TORCH_SPEC) into $(VENV)"; \
	  $(PIP) install $(TORCH_INDEX) $(TORCH_SPEC) 2>&1 | grep -v "is ignored"; \
	  test $${PIPESTATUS[0]} -eq 0 && echo "$(TORCH_SPEC) $(TORCH_INDEX)" > $@; \
	fi
	@test -f $@

# the package (editable) and its test dependencies; rebuilt when the build inputs change
$(VENV)/.vitfast-stamp: $(VENV)/.torch-stamp pyproject.toml setup.py $(CSRC)
	$(PIP) install ninja pybind11 2>&1 | grep -v "is ignored" ; test $${PIPESTATUS[0]} -eq 0
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -e ".[test]" 2>&1 | grep -v "is ignored" ; test $${PIPESTATUS[0]} -eq 0
	touch $@

$(VENV): $(VENV)/.vitfast-stamp

test: $(VENV)/.vitfast-stamp
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.vitfast-stamp
	$(VENV)/bin/vitfast bench $(BENCH_ARGS)

test-matrix: $(VENV)/.vitfast-stamp
	$(VPY) tests/host_matrix.py $(MATRIX_ARGS)

$(VENV)/triton-$(TRITON_GPU_VERSION)/.stamp: $(VENV)/.torch-stamp
	$(PIP) install --no-deps --target $(VENV)/triton-$(TRITON_GPU_VERSION) triton==$(TRITON_GPU_VERSION)
	touch $@

SM90_OUT ?= benchmarks/results/static
sm90-compile: $(VENV)/.vitfast-stamp $(VENV)/triton-$(TRITON_GPU_VERSION)/.stamp
	env -u TRITON_INTERPRET $(VPY) tests/ops/_sm90_compile.py --table $(SM90_CASES) \
	  --json $(SM90_OUT)/sm90_compile_triton-$$($(VPY) -c 'import triton; print(triton.__version__)').json
	env -u TRITON_INTERPRET PYTHONPATH=$(VENV)/triton-$(TRITON_GPU_VERSION) $(VPY) tests/ops/_sm90_compile.py \
	  --table $(SM90_CASES) --json $(SM90_OUT)/sm90_compile_triton-$(TRITON_GPU_VERSION).json

info: $(VENV)/.vitfast-stamp
	$(VENV)/bin/vitfast info

clean:
	rm -rf build vitfast/_C*.so *.egg-info
