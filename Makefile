# make install | lint | test | demo | format   (GNU make; PYTHON=... to pick an interpreter)
#
# `install` keeps a torch that already imports (e.g. a CUDA build) and installs a CPU build only
# when none does; see scripts/ensure_torch.py. Re-running it is cheap for an editable install.

PYTHON ?= python3

.PHONY: install lint test demo format

install:
	$(PYTHON) scripts/ensure_torch.py
	$(PYTHON) -m pip install -e '.[dev]'

lint:
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .

test: install
	$(MAKE) --no-print-directory lint
	$(PYTHON) -m pytest -q

demo: install
	eetb generate --model builtin --prompts-from-data 4

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .
