# The two commands of the README: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LIPGAN := $(VENV)/bin/lipgan
STAMP := $(VENV)/.installed-stamp
RUN_OUT ?= runs/quickstart

.PHONY: install data system-deps run test test-slow lint bench clean

install: $(STAMP)

# torch first, from the CPU build on this machine's disk, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian packages some tests use (Fashion-MNIST, Chromium); best effort, never fatal.
system-deps:
	bash scripts/system_deps.sh

data: install
	$(LIPGAN) data fetch mnist
	-$(LIPGAN) data fetch fashion-mnist

# A short default run: WGAN-GP on the WGAN-GP paper's MNIST networks at width 32 (a few minutes
# on 2 cores); samples in $(RUN_OUT)/samples/. A second `make run` resumes (or just reports) it.
run: install data
	@if [ -f $(RUN_OUT)/config.yaml ]; then \
		$(LIPGAN) train --resume $(RUN_OUT); \
	else \
		$(LIPGAN) train --method wgan-gp --model dcgan28 --width 32 --steps 800 \
			--sample-every 200 --out $(RUN_OUT); \
	fi
	@echo "run folder: $(RUN_OUT)  (samples: $(RUN_OUT)/samples/last.png, metrics: $(RUN_OUT)/metrics.csv)"

lint: install
	$(VENV)/bin/ruff check lipgan tests benchmarks

test: install system-deps data lint
	$(PY) -m pytest

test-slow: install system-deps data lint
	$(PY) -m pytest -m "slow or not slow"

bench: install data
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
