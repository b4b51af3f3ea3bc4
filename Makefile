# megatron-lite: `make install`, `make train`, `make test`. Hydra overrides go in ARGS:
#   make train ARGS="model=gpt2-small train.steps=1000"      make train NPROC=8 TP=8
#   make train RUN_DIR=runs/20250101-120000                    (resume that run from its newest checkpoint)

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

# processes per node: one per GPU when nvidia-smi finds GPUs, else 4 CPU processes (DP=2 x TP=2)
NPROC ?= $(or $(filter-out 0,$(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')),4)
# TP size of `make train` (parallel.tp defaults to 1 for `python train.py`): DP = NPROC / TP
TP ?= 2
# evaluated once, so every rank and the whole recipe see the same directory
ifndef RUN_DIR
RUN_DIR := runs/$(shell date +%Y%m%d-%H%M%S)
endif
ARGS ?=
SAMPLE ?= --max-new-tokens 200

.PHONY: install train test bench gpu-check sample clean

install: $(STAMP)

# torch first and pinned, so `pip install -e` finds torch>=2.4 satisfied and never pulls another build
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install torch==$(TORCH_VERSION)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

# train, then sample from the final checkpoint with the sampling command (one process: the checkpoint
# loads in any layout)
train: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py run_dir=$(RUN_DIR) parallel.tp=$(TP) sample.max_new_tokens=0 $(ARGS)
	$(PY) -m megatron_lite.generate $(RUN_DIR) $(SAMPLE)

test: install
	$(PY) -m pytest $(ARGS)

bench: install
	$(PY) -m benchmarks.run $(ARGS)

# one GPU, unattended, < 8 minutes: MFU, SDPA backend, memory, kernels, syncs, bf16 vs CPU float32, checkpoints
# across devices -> bench_results/gpu_check.json (ARGS="--device cpu": the same with small shapes, seconds)
gpu-check: install
	$(PY) -m benchmarks.gpu_check $(ARGS)

sample: install
	$(PY) -m megatron_lite.generate $(ARGS)

# build and test leftovers only: runs/ (checkpoints), data/cache/ (tokenized corpus) and .venv are kept
clean:
	rm -rf .pytest_cache build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
