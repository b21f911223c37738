# Each target works alone on a fresh clone: it creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UNAME := $(shell uname -s)
ifeq ($(UNAME),Darwin)
EXTRAS := dev
else
EXTRAS := dev,cpu
endif
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: run test test-fast lint bench clean blas-hint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m appliance.engine.builtin fetch
	touch $(STAMP)

run: $(STAMP) blas-hint
	$(BIN)/python -m appliance $(ARGS)

# The browser tests of the status page use Debian's chromium: installed here when missing (as
# root with apt-get), else they skip saying why.
test: $(STAMP) blas-hint
	sh scripts/ensure-chromium.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Linux: the appliance preloads OpenBLAS when it is installed (engine.cpu_blas=auto); without it
# the CPU backend multiplies with the mlx wheel's reference BLAS. make installs no system
# package itself (.ci/run does, as root): it says what to install.
blas-hint:
ifneq ($(UNAME),Darwin)
	@ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1 || \
		echo "note: no OpenBLAS: the CPU path is slow and its tests skip" \
			"(sudo apt-get install libopenblas0-pthread)"
endif

# The unit tests alone: no server, no model, seconds.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

# The benchmark (benchmarks/, not installed): the ceiling, mlx_lm.server and the appliance side by
# side; JSON and a PNG in bench-results/. Options through BENCH_ARGS, e.g. BENCH_ARGS="--quick".
bench: $(STAMP) blas-hint
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# ruff (line length enforced), mypy, and the import contracts of pyproject.toml (import-linter).
lint: $(STAMP)
	$(BIN)/ruff check appliance benchmarks tests
	$(BIN)/ruff format --check appliance benchmarks tests
	$(BIN)/mypy appliance benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
