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
	$(BIN)/pip install --quiet "uv>=0.9,<1"

# torch comes first and from pip: pip reads the machine's own configuration (a local wheel
# directory, version caps), and once torch is in, the package's torch range is met, so nothing
# resolves it to a multi-GB CUDA build on a CPU-only machine. The rest comes from uv, which
# downloads and unpacks in parallel (a 2-core install: 50 s with pip -> ~20 s). uv reads
# UV_INDEX_URL / UV_FIND_LINKS where pip would read PIP_INDEX_URL / PIP_FIND_LINKS.
# Nothing is byte-compiled here: the main job imports a small part of what is installed and
# Python compiles that on first import (~6 s against ~18 s for everything on 2 cores). The tests
# start many processes, so `make test` compiles everything first ($(VENV)/.compiled).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-compile "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e ".[dev]"
	touch $@

# compileall skips files written for newer Pythons (torch ships some), so its status is ignored.
$(VENV)/.compiled: $(VENV)/.installed
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib/python3*/site-packages > /dev/null || true
	touch $@

setup: $(VENV)/.installed

## Main job: prepare the bundled sample, train the default model, evaluate it against baselines.
run: setup
	$(BIN)/esci-reranker pipeline --config $(CONFIG) --out $(OUT) $(ARGS)

## All tests (plus lint and the import layering), offline.
test: setup $(VENV)/.compiled
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/pytest -q

bench: setup
	$(BIN)/esci-reranker bench --model $(OUT)/model --out $(OUT)/bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
