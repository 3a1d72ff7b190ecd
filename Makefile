# batchpilot — the whole set-up. Every target is idempotent and works on a fresh clone.
#   make demo   runs the main job on the embedded default
#   make test   runs the test suite (installs first)
# A GPU user picks another torch: make install TORCH_SPEC="torch==2.5.1" (with their index url in PIP_EXTRA).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev,export,data,bench
PIP_EXTRA  ?=
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed

.PHONY: install demo test test-slow lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet $(PIP_EXTRA) -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $(STAMP)

# The main job on the embedded default: probe, noise, plan, verify and the HTML report (CPU, ~5 min).
# It ends by printing where the report is. (`--gpu NAME --gpus N` adds a plan for a target cluster.)
demo: install
	$(BIN)/batchpilot tune --out runs/demo

# pytest exits 5 when it collects no test: that is a failure of the suite, not success.
test: install
	$(BIN)/python -m pytest

# The slow tests are optional: a run that selects none (exit 5) is fine here, unlike in `make test`.
test-slow: install
	$(BIN)/python -m pytest -m slow; rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports  # imports point down the layers ([tool.importlinter] in pyproject.toml)

# llm-analysis pins transformers<5, so it goes in without its dependencies (its estimator needs none).
bench: install
	$(BIN)/python -m pip install --quiet --no-deps llm-analysis
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
