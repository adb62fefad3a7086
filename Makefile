# Two commands for a fresh clone:  `make demo`  and  `make test`.
# Each creates .venv on first use and installs what it needs.
# `make demo` is the main job: GRPO on the embedded language model (a few minutes on 2 CPU cores, held-out numbers
# printed before and after); `make bandit` is the quick one (the bandit playground, seconds).
#
# The tested PyTorch lives here and only here. On this project's CPU machines
# `pip install torch==2.13.0` takes the local CPU build; a GPU user may run e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo bandit test lint format lock mutation install clean browser

demo: $(STAMP)
	$(BIN)/policygrad train --recipe recipes/default-cpu.yaml --overwrite
	$(BIN)/policygrad plot runs/default-cpu

bandit: $(STAMP)
	$(BIN)/policygrad bandit --plot bandit.png

# POLICYGRAD_NO_SKIPS: every optional dependency is installed here, so a skip other than the few named in
# tests/conftest.py fails the run (a dependency that failed to install must not read as a pass)
test: $(STAMP) browser
	POLICYGRAD_NO_SKIPS=1 POLICYGRAD_TIERS_REQUIRED=1 $(BIN)/python -m pytest -q

# The playground's browser tests drive Debian's chromium with Playwright (no browser download): installed here when
# missing and this is a Debian machine we may install on (root), else one line says what to install.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  echo "installing Debian's chromium for the browser tests (apt-get install chromium)" && \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "the playground's browser tests need Chromium at /usr/bin/chromium: sudo apt-get install chromium"

# ruff (configured in pyproject.toml): the layout is the formatter's, the lint rules catch unused names and bugbears.
# `make format` rewrites the files; `make lint` only checks (CI runs it before the tests).
lint: $(STAMP)
	$(BIN)/ruff format --check --quiet src tests benchmarks
	$(BIN)/ruff check --quiet src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format --quiet src tests benchmarks
	$(BIN)/ruff check --quiet --fix src tests benchmarks

# Mutation testing of the estimator math and the GRPO update (docs/testing.md): mutmut changes one operator or
# constant at a time and runs the fast tests of that function against it; the report prints the score per module and
# every mutant no test killed; then tests/named_mutants.py makes the issue's named wrong programs and fails if one
# survives. Slow (about 15 minutes on 2 cores), so neither `make test` nor CI runs it. Each run starts afresh
# (mutants/ is rebuilt). Narrow it with MUTANTS, mutmut's name globs, e.g.
#   make mutation MUTANTS="policygrad.losses.*"
MUTANTS       ?=
MUTATION_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

mutation: $(STAMP)
	rm -rf mutants
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	$(BIN)/python tests/mutation_report.py
	$(BIN)/python tests/named_mutants.py

install: $(STAMP)

# torch first, pinned, so the package's own `torch>=...` is already satisfied and pip pulls nothing else; then every
# other dependency at the exact version of constraints.txt (the locked environment; `make lock` refreshes it).
$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The lock: a fresh venv with the newest versions pip resolves today, frozen into constraints.txt (torch left out: it
# is pinned above). Commit the result with the test run that passed on it.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
	head -3 constraints.txt > constraints.txt.new
	$(LOCK_VENV)/bin/pip freeze --disable-pip-version-check --exclude-editable | grep -v '^torch==' >> constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) bandit.png runs/default-cpu mutants
