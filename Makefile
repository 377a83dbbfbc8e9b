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

# The recommended recipe (docs/recipes.md): spectral-norm critic, hinge loss, one critic step,
# TTUR, batch norm in the generator, generator EMA; at most 5 minutes of training, then a summary
# (FID, recall and classes of 10,000 EMA samples, W, the critic's measured Lipschitz constant)
# and an HTML report. A second `make run` resumes (or just summarizes) it.
run: install data
	@if [ -f $(RUN_OUT)/config.yaml ]; then \
		$(LIPGAN) train --resume $(RUN_OUT) --summary-eval-n 10000 --summary-report; \
	else \
		$(LIPGAN) train --method sn --recipe fast --width 32 --steps 100000 --max-time-s 300 \
			--summary-eval-n 10000 --summary-report --out $(RUN_OUT); \
	fi

lint: install
	$(VENV)/bin/ruff check lipgan tests benchmarks

# Two pytest workers (pytest-xdist), one per core, each test file kept on one worker; each worker
# runs torch on one thread (tests/conftest.py).
test: install system-deps data lint
	$(PY) -m pytest -n 2 --dist loadfile

test-slow: install system-deps data lint
	$(PY) -m pytest -m "slow or not slow"

bench: install data
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
