# pare — the only entry points a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
export PARE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[data,tokenizers,dev]"
	touch $(STAMP)

demo: install
	$(PY) scripts/demo.py

# Tests are offline by design: fail fast instead of retrying the Hub.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy src

bench: install
	$(PY) bench/eval_speed.py
	$(PY) bench/unstructured_vs_reference.py
	$(PY) bench/width_vs_reference.py
	$(PY) bench/depth_vs_reference.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
