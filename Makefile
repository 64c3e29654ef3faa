# pare — the only entry points a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# the tested versions of every dependency: `make install` (and so CI) installs exactly these
PINS   := constraints.txt
LATEST ?= .venv-latest
EXTRAS := .[data,tokenizers,dev,export,recover]
export PARE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test test-fast test-matrix test-latest constraints lint bench clean

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls several GB of CUDA wheels.
# Every other dependency comes at the version in $(PINS), so a new upstream release cannot turn a
# fresh clone red; `make test-latest` tells when a pin should move.
$(STAMP): pyproject.toml $(PINS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(PINS) "$(TORCH)"
	$(PIP) install -q -c $(PINS) -e "$(EXTRAS)"
	touch $(STAMP)

demo: install
	$(PY) scripts/demo.py

# Tests are offline by design: fail fast instead of retrying the Hub.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m "not matrix" tests

test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow and not matrix" tests

# Every registered stage on every tiny architecture (the fast suite runs a rotation that covers each).
test-matrix: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m matrix tests

# Not in CI: the suite against the newest releases of every dependency (torch stays pinned), in its
# own venv; then the installed versions that differ from $(PINS), i.e. the pins to move.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q "$(TORCH)"
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager "$(TORCH)" -e "$(EXTRAS)"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(LATEST)/bin/python -m pytest -q -p no:cacheprovider tests; \
	status=$$?; $(LATEST)/bin/python scripts/pin_diff.py $(PINS); exit $$status

# Rewrite $(PINS) from .venv after moving pins there (pare itself and torch's local tag left out).
constraints: install
	{ sed -n '/^#/p' $(PINS); $(PIP) freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > $(PINS).new
	mv $(PINS).new $(PINS)

lint: install
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy src

bench: install
	$(PY) bench/eval_speed.py
	$(PY) bench/unstructured_vs_reference.py
	$(PY) bench/width_vs_reference.py
	$(PY) bench/depth_vs_reference.py

clean:
	rm -rf $(VENV) $(LATEST) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache

# Every causal-LM and image-text-to-text model type of the installed transformers, as a tiny random
# model, through inspect / sparsity / depth / width: docs/coverage/coverage.md (about 20 minutes).
coverage: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) bench/coverage.py --out docs/coverage
