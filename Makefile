# Two commands do everything on a fresh machine:
#   make demo   install, then `medgemma-edge demo`: ask the built-in demo bundle about a CT slice
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
	@# tests/test_kiosk.py drives Debian's headless Chromium (`playwright install` would download one)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo 'chromium not installed (needs root): tests/test_kiosk.py will be skipped'
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,dev,serve]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

demo: $(STAMP)
	$(BIN)/medgemma-edge demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) build *.egg-info
