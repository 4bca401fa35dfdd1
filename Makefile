# The two Quick start commands: `make demo` and `make test`.
PYTHON ?= python
DEMO_EXPERIMENT ?= synthetic_r18_os8
DEMO_DIR ?= runs/demo

.PHONY: install install-test demo test test-slow lint format

install:
	$(PYTHON) -m pip install -e .

# The test extras include ruff (pinned), so `make lint` works after this.
install-test:
	$(PYTHON) -m pip install -e .[test]

# Install, generate the synthetic dataset, train, evaluate: a few minutes on a CPU.
demo: install
	$(PYTHON) scripts/make_synthetic.py --output_dir=data/synthetic_raw
	$(PYTHON) scripts/prepare_data.py --dataset=synthetic --manual_dir=data/synthetic_raw --data_dir=data/tfds
	$(PYTHON) scripts/train.py --experiment=$(DEMO_EXPERIMENT) --workdir=$(DEMO_DIR)
	$(PYTHON) scripts/evaluate.py --experiment=$(DEMO_EXPERIMENT) --workdir=$(DEMO_DIR) --output=$(DEMO_DIR)/eval.json

test: install-test
	$(PYTHON) -m pytest -q

test-slow: install-test
	$(PYTHON) -m pytest -q --slow

# `python -m ruff`: the ruff that install-test put beside $(PYTHON), not another one on PATH.
lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format . && $(PYTHON) -m ruff check --fix .
