# Two commands do everything on a fresh machine:
#   make demo   ask the built-in demo bundle about a CT slice (builds it on first use)
#   make test   create the environment, build the reference models, run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test test-all demo bench bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel setuptools

# torch==2.13.0 is the CPU build that lies on this machine's disk; pinning it here (not in
# pyproject) keeps a multi-GB CUDA build from being pulled while leaving users free to choose.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

demo: $(STAMP)
	$(BIN)/medgemma-edge ask --stats --max-tokens 64 --image "$$($(BIN)/python -c 'from pydicom.data import get_testdata_file as g; print(g("CT_small.dcm"))')" "Describe this CT slice."

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) build *.egg-info
