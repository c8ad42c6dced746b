# scproto — common tasks. `make help` lists them.
PYTHON ?= python
TORCH_CPU ?= torch==2.13.0

.PHONY: help install train test test-all lint format docs clean

help:  ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## install the project and its dev tools (CPU torch first where torch is missing)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_CPU)
	$(PYTHON) -m pip install -e '.[dev]'

train: install  ## train on the embedded synthetic data (outputs/train/runs/<time>/)
	$(PYTHON) train.py

test: install  ## the default test suite (skips tests marked slow); installs first
	$(PYTHON) -m pytest -m "not slow" -q || [ $$? -eq 5 ]  # 5: no tests collected

test-all: install  ## every test, slow ones included
	$(PYTHON) -m pytest -q

lint:  ## ruff lint + format check
	$(PYTHON) -m ruff check scproto tests scripts train.py
	$(PYTHON) -m ruff format --check scproto tests scripts train.py

format:  ## apply ruff fixes and formatting
	$(PYTHON) -m ruff check --fix scproto tests scripts train.py
	$(PYTHON) -m ruff format scproto tests scripts train.py

docs:  ## build the API reference site into site/ (installs the docs extra first)
	$(PYTHON) -c "import mkdocs, mkdocstrings" 2>/dev/null || $(PYTHON) -m pip install -e '.[docs]'
	cp CHANGELOG.md docs/changelog.md
	$(PYTHON) -m mkdocs build --strict

clean:  ## remove caches and build files (not outputs/)
	rm -rf .pytest_cache .ruff_cache .cache build site *.egg-info docs/changelog.md
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
