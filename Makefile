# Two commands do all set-up on a fresh machine:
#   make demo   -- builds/refreshes .venv, then runs `apexlens demo` on the shipped toy models (offline)
#   make test   -- builds/refreshes the environments, then runs ruff, mypy and pytest in each
#
# TORCH_SPEC picks the torch build installed first (default: the CPU wheel this project is
# developed on). Override for another build, e.g. `make test TORCH_SPEC="torch==2.5.1"`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TL3_SPEC ?= transformer-lens==3.9.0
TL4_SPEC ?= transformer-lens==4.3.0

# pytest workers (pytest-xdist): one per core by default; each test file stays on one worker,
# so a module's expensive fixtures (executed notebooks, the demo run) are computed once.
PYTEST_WORKERS ?= auto
PYTEST_ARGS := -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15

VENV := .venv
VENV4 := .venv-tl4

.PHONY: demo test test-tl3 test-tl4 lint bench env env-tl4 clean chromium

# The stamp is rebuilt whenever pyproject.toml or this Makefile changes, so the environment
# is refreshed by the same command that uses it.
$(VENV)/.stamp: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q "$(TL3_SPEC)" -e ".[dev]"
	touch $@

$(VENV4)/.stamp: pyproject.toml Makefile
	test -x $(VENV4)/bin/python || $(PYTHON) -m venv $(VENV4)
	$(VENV4)/bin/python -m pip install -q --upgrade pip
	$(VENV4)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV4)/bin/python -m pip install -q "$(TL4_SPEC)" -e ".[dev]"
	touch $@

env: $(VENV)/.stamp
env-tl4: $(VENV4)/.stamp

demo: $(VENV)/.stamp
	$(VENV)/bin/apexlens demo --overwrite

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check apexlens tests benchmarks
	$(VENV)/bin/mypy apexlens

# The workbench's browser tests drive the system's headless Chromium (playwright, no browser
# download): installed here from the system's packages when missing and run as root.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: install it (e.g. apt-get install chromium) to run the browser tests"; fi

test-tl3: lint chromium
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-tl4: $(VENV4)/.stamp chromium
	$(VENV4)/bin/python -m pytest $(PYTEST_ARGS)

# Both halves run even when the first fails (a busy machine once stopped `make test` after the
# TL 3 half, so the TL 4 half never ran); each half's result is printed at the end, and the
# target fails if either did.
test:
	@tl3=passed; tl4=passed; \
	$(MAKE) --no-print-directory test-tl3 || tl3=FAILED; \
	$(MAKE) --no-print-directory test-tl4 || tl4=FAILED; \
	echo "make test: TransformerLens 3 half $$tl3, TransformerLens 4 half $$tl4"; \
	test $$tl3 = passed && test $$tl4 = passed

bench: $(VENV)/.stamp
	$(VENV)/bin/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(VENV4) .pytest_cache .mypy_cache .ruff_cache
