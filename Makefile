# The two commands a newcomer needs:
#   make quickstart   # venv + install + embedded data + train every stage on CPU + picture + evaluation
#   make test         # venv + install with dev extras + the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
QUICKSTART_DIR ?= outputs/quickstart

.PHONY: quickstart test install install-dev clean help

help:
	@echo "make quickstart  - install, build embedded shards, train all stages on CPU, write pictures"
	@echo "make test        - install with dev extras and run the test suite"

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch and torchvision are installed together first, so no later requirement pulls a second torch.
$(VENV)/.torch-installed: | $(PY)
	$(PIP) install torch torchvision
	touch $@

$(VENV)/.installed: setup.py $(VENV)/.torch-installed
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: setup.py $(VENV)/.installed
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

quickstart: install
	SET=shapes OUT=$(QUICKSTART_DIR) PY=$(PY) bash scripts/pipeline.sh

test: install-dev
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf logs outputs multirun wandb .pytest_cache
