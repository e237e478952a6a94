# The two commands the README opens with:
#   make demo   bring up the local Slurm test bed and run the main job on it
#   make test   run the whole test suite (lint, unit and end-to-end)
# Both install what is missing first (Debian packages, the pinned toolchain, the Python
# environment), and both are safe to repeat.

SHELL := /bin/bash
# Debian's interpreter when there is one: a venv made from it can be used by every user,
# which the tests that run as an ordinary user need.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV := .venv
HPK := $(VENV)/bin/hpk

.PHONY: demo test lint unit e2e conformance toolchain venv

toolchain:
	@bash container/build-toolchain.sh

$(VENV)/.installed: pyproject.toml
	@echo "[setup] Python environment in $(VENV) (from $(PYTHON))"
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

demo: toolchain venv
	@$(HPK) dev up
	@$(HPK) dev demo

lint: venv
	@echo "[test] ruff and mypy"
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy

unit: venv
	@echo "[test] unit tests"
	@$(VENV)/bin/pytest tests/unit

e2e: toolchain venv
	@echo "[test] end-to-end tests on the real stack"
	@$(VENV)/bin/pytest tests/e2e

test: toolchain lint unit e2e

# Every [sig-network] conformance test of Kubernetes' own e2e.test (built from the pinned
# module) against an ordinary user's cluster: prints passed / total and each failure's
# reason. The test suite runs a few of them; this runs them all (an hour or more).
conformance: toolchain venv
	@echo "[conformance] [sig-network] conformance tests, all of them"
	@HPK_CONFORMANCE=all $(VENV)/bin/pytest -s tests/e2e/test_conformance.py

# make bench   the benchmark (bench/) on a private Slurm bed of its own, as root; writes
#              bench/results/<date>.json and .png. BENCH_ARGS=--quick for small numbers.
BENCH_ARGS ?=
.PHONY: bench bench-rootfs bench-network

bench: toolchain venv
	@echo "[bench] hpk benchmark on a private Slurm bed (full run: about 5 minutes)"
	@$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

# make bench-rootfs   the cost of a container's writable root file system (bench/rootfs.py),
#                     as the ordinary test user; writes bench/results/<date>-rootfs.json.
bench-rootfs: toolchain venv
	@echo "[bench] writable root file system: start time and memory (about 1 minute)"
	@id hpk-e2e >/dev/null 2>&1 || useradd --create-home --shell /bin/bash hpk-e2e
	@$(VENV)/bin/python -m bench.rootfs

# make bench-network   the pod network's costs beside the node's network (bench/network.py): a
#                      hub and pods built as the jobs build them, without Slurm, as the
#                      ordinary test user; writes bench/results/<date>-network.json.
#                      BENCH_ARGS=--quick for small numbers.
bench-network: toolchain venv
	@echo "[bench] pod network: start, throughput, DNS, memory, hub CPU (about 3 minutes)"
	@id hpk-e2e >/dev/null 2>&1 || useradd --create-home --shell /bin/bash hpk-e2e
	@$(VENV)/bin/python -m bench.network $(BENCH_ARGS)
