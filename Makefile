# The doors: `make run` (the nightly batch on the embedded default), `make tune` (its caps, measured
# on the same demo data), `make test`, `make lint`, `make bench`.
# Each creates the virtualenv it needs on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install run tune test lint bench clean

install: $(STAMP)

# pip's output (and the build backend's) goes to $(PIP_LOG), shown only when an install fails.
PIP_LOG := $(VENV)/pip.log
pip = $(PY) -m pip --quiet --disable-pip-version-check --no-input $(1) >>$(PIP_LOG) 2>&1 \
	|| { cat $(PIP_LOG); echo "make: pip $(1) failed; its log is $(PIP_LOG)" >&2; exit 1; }

# dev: the engine, the stages, matplotlib (report.html, tune --plot), dask[distributed] (the Dask tests)
# and the test and lint tools.
$(STAMP): pyproject.toml
	@echo "setting up $(VENV): the engine, the stages and the dev tools (once; log in $(PIP_LOG))"
	@$(PYTHON) -m venv $(VENV)
	@: >$(PIP_LOG)
	@$(call pip,install --upgrade pip)
	@$(call pip,install -e '.[dev]')
	@touch $@

# bench: the peers the benchmark compares the engine with.
$(BENCH_STAMP): $(STAMP)
	@echo "installing the benchmark's peers into $(VENV) (once)"
	@$(call pip,install -e '.[dev,bench]')
	@touch $@

# The nightly image batch from config.toml, on the embedded SQLite catalog with demo images served
# over loopback HTTP: no database server and no internet needed. Extra flags: make run ARGS="--limit 5".
run: $(STAMP)
	$(PY) -m stages.demo config.toml $(ARGS)

# Measure the caps of config.toml on the demo data, served for the duration (see `pipeline tune`).
# Extra flags: make tune ARGS="--stage download --write".
tune: $(STAMP)
	$(PY) -m stages.demo tune config.toml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(BENCH_STAMP)
	$(PY) -m bench $(ARGS)

clean:
	rm -rf var runs .pytest_cache .mypy_cache .ruff_cache
