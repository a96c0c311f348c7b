# make install | lint | test | demo | format   (GNU make; PYTHON=... to pick an interpreter)
#
# `install` keeps a torch that already imports (e.g. a CUDA build) and installs a CPU build only
# when none does; see scripts/ensure_torch.py. Re-running it is cheap for an editable install.

PYTHON ?= python3

.PHONY: install lint test demo format samples

install:
	$(PYTHON) scripts/ensure_torch.py
	$(PYTHON) -m pip install -e '.[dev]'

lint:
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .

test: install
	$(MAKE) --no-print-directory lint
	$(PYTHON) -m pytest -q

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
