# The README's two commands: `make run` (default experiment) and `make test` (the test suite).
# Each creates or updates .venv and installs what it needs; torch is pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: run test test-quick lint bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[pybullet,sb3,dev]'
	# mpc.pytorch is a reference for tests and benchmarks only; its numpy<2 pin is wrong.
	$(PIP) install -q --no-deps mpc==0.0.6
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m diffmpc.agents.cli demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n 2 tests

test-quick: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n 2 -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/solver_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
