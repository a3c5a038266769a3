# Quick start: `make demo` (a real 4-replica cluster on loopback) and `make test`.
# Both create .venv and install what they need (and the compiled core, below); `make install`
# does only that.
# `make lint` runs ruff and mypy alone; `make test` runs them before the tests.
# `make test-fast` leaves out the suites marked slow (seed sweeps, real processes, namespaces);
# `make test-long` runs only the long ones make test leaves out (throughput scenarios at n=7,
# the big swarm: about half an hour), printing each one's time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-fast test-long sim bench native clean

# install also compiles the core and the codec with mypyc into .native/ (tools/build_native.py
# --auto: about a minute on 2 cores, only when no build matches the sources; a failure says why
# and pbft runs the pure modules; PBFT_NATIVE=0 make install skips it).
install: $(STAMP)
	@$(PY) tools/build_native.py --auto || echo "native: not built; the pure modules run"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "python3-venv missing: installing it with apt-get"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv; }
	@bash scripts/ensure-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: install
	$(VENV)/bin/pbft demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m 'not slow and not long'

test-long: install
	$(PY) -m pytest -m long --durations=0 -rA

sim: install
	$(VENV)/bin/pbft sim --seeds 1000 --replicas 4 --faults crash,loss,dup,reorder,delay,replay,partition

bench: install
	$(PY) benchmarks/mac_bench.py

# The pure layers and the core compiled with mypyc into .native/ (not the source tree), built
# again even if the current build matches. pbft uses it only while it matches the sources
# (`pbft native` tells); PBFT_NATIVE=0 runs the pure modules.
native: $(STAMP)
	$(PY) tools/build_native.py

clean:
	rm -rf $(VENV) build .native src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
