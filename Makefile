# The two commands of the README. Both install first, so each works on a fresh machine.
# torch is pinned and installed on its own first: an unpinned torch would pull several GB of CUDA wheels.
PYTHON ?= python3
OUT ?= artifacts/default
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

demo: install
	$(PYTHON) -m api.cli run --out $(OUT)

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	$(PYTHON) -m pytest -q
