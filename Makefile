# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A CPU wheel of this torch is what the project is tested with; a plain `pip install torch`
# would pull the multi-GB CUDA bundle, so torch is installed only when it is not importable.
TORCH_SPEC ?= torch==2.13.0

.PHONY: env test test-gpu demo bench lint clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

env: $(VENV)/.installed

test: env
	$(PY) -m pytest -q

test-gpu: env
	$(PY) -m pytest -q -m gpu

demo: env
	$(PY) -m chronovisor.cli sweep configs/quickstart.yaml --out runs/quickstart
	$(PY) -m chronovisor.cli report runs/quickstart

bench: env
	$(PY) -m benchmarks

lint: env
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info runs
