# Entry points for users and CI. Every target sets itself up through `install` (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

CONFIG ?= configs/demo/teacher_retinanet_r34.yaml
CACHE  ?= output/demo/cache
BUDGET ?=
OPTS   ?=
# e.g. BENCH_OPTS=--quick, or --with-accuracy for the (up to an hour) accuracy reproduction
BENCH_OPTS ?=

.PHONY: install demo test test-all lint test-compat gpu-check stage1 stage2 bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ''

# ruff (pyflakes, pycodestyle errors, isort, bugbear, pyupgrade; the formatter) and import-linter's
# contracts for the layering ARCHITECTURE.md states; settings in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The default suite at both ends of pyproject's torch range, each in its own venv under .compat/
# (tools/test_compat.py; the first run downloads two torch builds). PYTEST_ARGS go to pytest.
test-compat:
	$(PYTHON) tools/test_compat.py $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

# The CUDA and mixed-precision paths on one GPU in <= 8 minutes (bench/gpu_check.py): the cuda-marked
# tests, stage one and two under AMP, an accuracy smoke run -> bench/results/gpu/. Exits 2 without CUDA.
gpu-check: install
	$(BIN)/python -m bench.gpu_check

demo: install
	$(BIN)/python demo.py

stage1: install
	$(BIN)/icd dump --config-file $(CONFIG) --cache $(CACHE) $(if $(BUDGET),--budget $(BUDGET)) $(OPTS)

stage2: install
	$(BIN)/icd distill --config-file $(CONFIG) --cache $(CACHE) $(OPTS)

bench: install
	$(BIN)/python -m bench.run_all $(BENCH_OPTS)

clean:
	rm -rf output
