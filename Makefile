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

# Until the capture → simulate → validate loop exists, the demo runs the built-in model on a few
# prompts (held-out CNN/DM articles when EETB_DATA_DIR is set), full depth and with early exit.
DEMO_PROMPTS = $(if $(EETB_DATA_DIR),--prompts-from-data 3,--prompt "The court said on Tuesday that" --prompt "Scientists have found")

demo: install
	$(PYTHON) -m testbed.cli generate $(DEMO_PROMPTS) --max-tokens 40
	$(PYTHON) -m testbed.cli generate $(DEMO_PROMPTS) --max-tokens 40 --batching quorum \
		--batching-param fraction=0.75 --rule hidden --threshold 0.95 --min-exit-layer 4

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
