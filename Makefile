# Two entry points for a fresh clone (see README):  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU torch by default. On a GPU machine: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG ?= configs/multi_task.yaml
OUT    ?= runs/default
# More pipeline options, e.g. ARGS="--set mixed_precision=no" (fp32 training, as a host without
# native bf16 trains)
ARGS   ?=

.PHONY: setup run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# torch is installed on its own first so the package's torch range is already met and pip never
# resolves it to a multi-GB CUDA build on a CPU-only machine. pip byte-compiles what it installs
# on one core; compileall does the same on every core (70 s -> 56 s of a 2-core install). Like
# pip, it skips files written for newer Pythons (torch ships some), so its status is ignored.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-compile "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet --no-compile -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

setup: $(VENV)/.installed

## Main job: prepare the bundled sample, train the default model, evaluate it against baselines.
run: setup
	$(BIN)/esci-reranker pipeline --config $(CONFIG) --out $(OUT) $(ARGS)

## All tests (plus lint and the import layering), offline.
test: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/pytest -q

bench: setup
	$(BIN)/esci-reranker bench --model $(OUT)/model --out $(OUT)/bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
