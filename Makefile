# cxrlt: `make install`, `make test` (see README.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cxrlt-installed
KERNEL := cxrlt

.PHONY: install test lint hooks check-notebooks nbtest pytest export clean-venv demo ceiling site screenshots
TABLE ?= runs/table-demo
# the ceiling reference of the demo: row 1 on the same data and split, 12 epochs (the demo trains 3)
CEILING := {"1": {"epochs": 12}}

install: $(STAMP)

# Re-installs only when the package metadata or the pins change; otherwise a no-op.
$(STAMP): setup.py settings.ini constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name 'Python (cxrlt)' >/dev/null
	touch $(STAMP)

export: install
	$(BIN)/nbdev_export

# Fails when nbdev_export or nbdev_clean would change a tracked file, naming the notebook.
check-notebooks: install
	$(BIN)/python .ci/check_notebooks.py

# ruff over the notebooks (the source), tests, benchmarks and CI scripts; settings in pyproject.toml.
lint: install
	$(BIN)/ruff check

# nbdev_clean, nbdev_export and ruff before every commit (see .pre-commit-config.yaml).
hooks: install
	$(BIN)/pre-commit install

nbtest: install
	$(BIN)/nbdev_test --n_workers 2

pytest: install
	$(BIN)/python -m pytest tests

test: install
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory check-notebooks
	$(MAKE) --no-print-directory nbtest
	$(MAKE) --no-print-directory pytest

clean-venv:
	rm -rf $(VENV)

# The main job on the embedded default: synthetic data, all 20 rows (the paper's 17 and 3 of its future work; CPU proxies), Grad-CAM explorer, site.
demo: install
	$(BIN)/cxrlt table --preset demo --out $(TABLE)
	$(BIN)/cxrlt cam --run $(TABLE)/runs --out $(TABLE)/explorer
	$(BIN)/cxrlt site --table $(TABLE) --explorer $(TABLE)/explorer

# After `make demo`: the ceiling reference the results page draws per class group (5 to 7 minutes here).
ceiling: install
	$(BIN)/cxrlt table --preset demo --rows 1 --data $(TABLE)/data/synthetic-demo --out $(TABLE)/ceiling \
		--overrides '$(CEILING)'
	$(BIN)/cxrlt site --table $(TABLE) --explorer $(TABLE)/explorer

# The site alone, from the last demo table when there is one.
site: install
	$(BIN)/cxrlt site $(if $(wildcard $(TABLE)/table.json),--table $(TABLE)) $(if $(wildcard $(TABLE)/explorer/index.html),--explorer $(TABLE)/explorer)

# After `make demo`: the README's screenshots of the site's home and results pages (1400 px wide, headless Chromium).
screenshots: install
	$(BIN)/python -c "from cxrlt.site import screenshot_pages; print(*screenshot_pages('_site', 'nbs/images'), sep='\n')"
