# Two commands do everything on a fresh machine:
#   make demo   install, then `medgemma-edge demo`: ask the built-in demo bundle about a CT slice
#   make test   create the environment, build the reference models, run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEBS    := chromium orthanc orthanc-dicomweb dcmtk

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
	@# Real components the tests drive (Debian's packages, never a download of their own): chromium
	@# for the kiosk page (tests/test_kiosk.py), Orthanc with its DICOMweb plugin as the PACS and
	@# dcmtk as a modality (tests/test_node*.py). As root (CI) a failed install stops make; as another
	@# user it is said, and the tests that need them fail.
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:" $$missing "(apt-get install them as root): the tests that use them fail"; fi; \
	fi
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
