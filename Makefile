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

# torch is pinned here, not in pyproject (which asks torch>=2.4, so users choose their own build and
# index): the test environment gets the version the tests were checked with. pip takes the highest
# 2.13.0 build it can see: a CPU wheel (2.13.0+cpu, from --find-links or PyTorch's CPU index, when
# pip is configured with one); from PyPI alone, Linux x86_64 gets the CUDA build (several GB with its
# nvidia-* wheels), macOS and Windows a CPU one. Installed first, it is the torch `.[export]` keeps.
$(STAMP): pyproject.toml | $(BIN)/python
	@# tests/test_kiosk.py drives Debian's headless Chromium (`playwright install` would download one).
	@# As root (CI) a failed install stops make; as another user it is said, and the kiosk tests
	@# fail unless MEDGEMMA_EDGE_ALLOW_NO_BROWSER=1.
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq chromium)
	@command -v chromium >/dev/null || echo 'chromium is missing (apt-get install chromium as root): tests/test_kiosk.py' \
		'fails without it unless MEDGEMMA_EDGE_ALLOW_NO_BROWSER=1'
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
