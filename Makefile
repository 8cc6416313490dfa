# eptq_fx developer commands. `make demo` and `make test` create .venv on first use and keep it up to date.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,demo
TORCH_VERSION := 2.13.0
# pip must never resolve PyPI's CUDA build of torch (gigabytes): on Linux we ask for the CPU build by its local
# version label, which only a local wheel in pip's find-links or the CPU wheel index provides (tried in that
# order: an unreachable index costs minutes of retries).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(shell uname -s),Linux)
TORCH_SPEC := torch==$(TORCH_VERSION)+cpu
else
TORCH_SPEC := torch==$(TORCH_VERSION)
endif
# Exit status 0 when the venv already has a CPU-only torch of the pinned version.
TORCH_OK := import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)' or torch.version.cuda is not None)

.PHONY: demo test test-slow bench install clean-venv

demo: $(VENV)/.installed
	$(PY) -m examples.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.compare

install: $(VENV)/.installed

$(PY):
	$(PYTHON) -m venv $(VENV)

# The stamps make a second `make test` skip pip entirely until pyproject.toml changes.
$(VENV)/.torch: | $(PY)
	@$(PY) -c "$(TORCH_OK)" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)" 2>/dev/null || \
		$(PY) -m pip install "$(TORCH_SPEC)" --extra-index-url $(TORCH_INDEX)
	@$(PY) -c "$(TORCH_OK)" || (echo "error: $(VENV) needs a CPU-only torch $(TORCH_VERSION)" >&2; exit 1)
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e '.[$(EXTRAS)]' "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -e '.[$(EXTRAS),bench]' "$(TORCH_SPEC)"
	@touch $@

clean-venv:
	rm -rf $(VENV)
