# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A CPU wheel of this torch is what the project is tested with. Torch is installed only when it is not
# importable (install the build you want into .venv first to choose another): on a machine without
# CUDA the CPU build from PyTorch's CPU wheel index when it answers, plain pip otherwise (on PyPI for
# Linux that is the multi-GB CUDA bundle); scripts/install_torch.py prints which it did.
TORCH_SPEC ?= torch==2.13.0
# The quickstart model is tiny: more intra-op threads only add synchronisation (on a busy 2-core
# machine 2 threads ran 2.7x slower than 1). `make demo DEMO_THREADS=2` to change it.
DEMO_THREADS ?= 1

.PHONY: env test test-gpu demo bench lint clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) scripts/install_torch.py "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

env: $(VENV)/.installed

test: env
	$(PY) -m pytest -q

test-gpu: env
	$(PY) -m pytest -q -m gpu

# Measured: 290 CPU-seconds on one thread (21 cells of ~13 s, then the report), so ~5 minutes on an
# idle core; 41 minutes on a 2-core machine shared at load average 13-15. A rerun skips finished cells.
demo: env
	@echo "demo: 21 cells (3 seeds x 7 arms) on $(DEMO_THREADS) torch thread(s), then the report:" \
	      "about 5 minutes on an idle core, longer on a busy machine (41 min at load average 14 on 2 cores)"
	OMP_NUM_THREADS=$(DEMO_THREADS) MKL_NUM_THREADS=$(DEMO_THREADS) $(PY) -m chronovisor.cli sweep configs/quickstart.yaml --out runs/quickstart
	OMP_NUM_THREADS=$(DEMO_THREADS) MKL_NUM_THREADS=$(DEMO_THREADS) $(PY) -m chronovisor.cli report runs/quickstart

bench: env
	$(PY) -m benchmarks

lint: env
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info runs
