# Two commands on a fresh clone: `make demo` and `make test` (see README.md). They need the
# package index for the first install only; the demo's dataset ships in the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests run multi-device code on 4 forced host CPU devices.
TEST_XLA_FLAGS ?= --xla_force_host_platform_device_count=4

.PHONY: demo test bench bench-accel venv clean

# pyproject.toml is the one dependency list: the package and its "test" extra.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m spreading_jax demo

# Test processes (pytest-xdist): one per core, at most 4 (each holds a jax runtime, ~1 GB).
TEST_WORKERS ?= $(shell n=$$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2); \
                  [ "$$n" -gt 4 ] && n=4; [ "$$n" -lt 1 ] && n=1; echo $$n)

# Lint (ruff, configured in pyproject.toml), then the tests and the package's doctests,
# spread over TEST_WORKERS processes a test file at a time (a file's fixtures are built once).
test: $(VENV)/.installed
	$(PY) -m ruff check .
	XLA_FLAGS="$(TEST_XLA_FLAGS)" $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Every benchmark; bench_accel.py runs only where JAX sees a GPU/TPU (it says so otherwise).
bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The paper recipe at full scale on the default accelerator (one command for a GPU/TPU owner);
# BENCH_ACCEL_ARGS=--small runs the same code paths on a CPU in seconds.
bench-accel: $(VENV)/.installed
	$(PY) benchmarks/bench_accel.py $(BENCH_ACCEL_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
