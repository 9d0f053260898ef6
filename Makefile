# Two commands on a fresh machine:
#   make test    set up .venv (torch, the package with its C++/CUDA extension) and run the tests
#   make bench   the same set-up, then the benchmark (`vitfast bench`)
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

VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check -q
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: test bench $(VENV) clean info FORCE
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

info: $(VENV)/.vitfast-stamp
	$(VENV)/bin/vitfast info

clean:
	rm -rf build vitfast/_C*.so *.egg-info
