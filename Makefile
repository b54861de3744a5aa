# ctl_jax developer commands. Everything runs inside .venv/, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet -c constraints.txt
# Compiled XLA programs are cached here so repeated runs skip compilation.
export CTL_JAX_COMPILATION_CACHE ?= $(CURDIR)/.cache/jax

.PHONY: install test lint docs browser demo benchmarks clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PIP) -e '.[docs]'
	touch $@

install: $(VENV)/.installed

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check ctl_jax tests benchmarks configs
	$(VENV)/bin/ruff format --check ctl_jax tests benchmarks configs

# Two pytest workers (pytest-xdist): compilation is mostly single-threaded, so two cores
# finish the suite in about three quarters of one worker's time (cold, 2 cores: 15m24 ->
# 11m50). More workers: make test TEST_WORKERS=4.
TEST_WORKERS ?= 2

test: lint docs browser
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) tests

# The documentation site (mkdocs.yml): docs/ -> site/ (open site/index.html). --strict makes
# a broken link or anchor, or a page missing from the nav, an error, so `make test` fails on
# them. The API page is read from the source (griffe): no jax import, about 3 s.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Headless Chromium for the search page's test (tests/test_serve.py): Debian's chromium,
# installed when missing if we are root with apt-get (as CI is); else that test is skipped
# and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| command -v google-chrome >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium >/dev/null) || echo "could not install chromium: the page test is skipped"; \
	else echo "no Chromium (apt-get install chromium): the page test is skipped"; fi

data/synthetic_reid: | $(VENV)/.installed
	$(PY) -m ctl_jax.data.synthetic --output=data/synthetic_reid

demo: $(VENV)/.installed data/synthetic_reid
	$(PY) -m ctl_jax.train --config=configs/default.py --workdir=runs/default
	$(PY) -m ctl_jax.evaluate --config=configs/default.py --workdir=runs/default \
		--output=runs/default/metrics.json --overwrite

clean:
	rm -rf .cache .pytest_cache .ruff_cache site
