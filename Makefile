# ctl_jax developer commands. Everything runs inside .venv/, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet -c constraints.txt
# Compiled XLA programs are cached here so repeated runs skip compilation.
export CTL_JAX_COMPILATION_CACHE ?= $(CURDIR)/.cache/jax

.PHONY: install test lint demo benchmarks clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check ctl_jax tests benchmarks configs
	$(VENV)/bin/ruff format --check ctl_jax tests benchmarks configs

# Two pytest workers (pytest-xdist): compilation is mostly single-threaded, so two cores
# finish the suite in about three quarters of one worker's time (cold, 2 cores: 15m24 ->
# 11m50). More workers: make test TEST_WORKERS=4.
TEST_WORKERS ?= 2

test: lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) tests

data/synthetic_reid: | $(VENV)/.installed
	$(PY) -m ctl_jax.data.synthetic --output=data/synthetic_reid

demo: $(VENV)/.installed data/synthetic_reid
	$(PY) -m ctl_jax.train --config=configs/default.py --workdir=runs/default
	$(PY) -m ctl_jax.evaluate --config=configs/default.py --workdir=runs/default \
		--output=runs/default/metrics.json --overwrite

clean:
	rm -rf .cache .pytest_cache .ruff_cache
