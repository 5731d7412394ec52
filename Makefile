# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench bench-deploy style check clean

# torch is installed first and pinned: an unpinned torch pulls several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,demo,deploy]" "torch==$(TORCH_VERSION)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qbert-hessian demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The peers of the benchmark, pinned, installed without dependencies: curvlinops' backpack lists torchvision, whose
# PyPI build is for another torch and breaks the import of anything that loads it (its other dependencies are here).
BENCH_PEERS := "pyhessian==0.1" "hessian-eigenthings==1.0.0a5" "curvlinops-for-pytorch==3.0.1" \
	"backpack-for-pytorch==1.7.1" "unfoldNd==0.2.3" "einconv==0.1.0" "einops==0.8.2" "linear_operator==0.6.1" \
	"opt-einsum==3.4.0"
SST2_DATA ?= ../shared/data/sst2

# The fine-tuned checkpoints the benchmarks analyse (made once; metrics.json is written last).
runs/sst2/checkpoint/metrics.json: | $(STAMP)
	$(VENV)/bin/qbert-hessian finetune --model minilm-l6 --task sst2 --data $(SST2_DATA) \
		--max-train-samples 8000 --epochs 2 --max-length 64 --out runs/sst2/checkpoint
runs/bbc/checkpoint/metrics.json: | $(STAMP)
	$(VENV)/bin/qbert-hessian finetune --model minilm-l6 --task bbc-news --epochs 2 --batch-size 16 --lr 1e-4 \
		--out runs/bbc/checkpoint

# Every engine on SST-2 (RESULTS.md) and BBC News (RESULTS_BBC.md), one product's cost per block (PRODUCTS.md),
# then the trace estimators (TRACES.md).
bench: $(STAMP) runs/sst2/checkpoint/metrics.json runs/bbc/checkpoint/metrics.json
	$(PY) -m pip install -q --no-deps $(BENCH_PEERS)
	$(PY) benchmarks/bench_sensitivity.py --task sst2 --model runs/sst2/checkpoint --data $(SST2_DATA)
	$(PY) benchmarks/bench_sensitivity.py --task bbc-news --model runs/bbc/checkpoint
	$(PY) benchmarks/product_profile.py --model runs/bbc/checkpoint
	$(PY) benchmarks/bench_traces.py --model runs/sst2/checkpoint --data $(SST2_DATA)
	$(MAKE) bench-deploy

# What serving costs (DEPLOY.md): packed BBC News checkpoints (uniform 8/4/2 and mixed 2/4 bits, priced for the ONNX
# file) made by one run from runs/bbc/checkpoint, then every engine on them and on a BERT-base-shaped random model.
# DEPLOY_CONFIG, DEPLOY_RUN, DEPLOY_RUN_FLAGS and DEPLOY_FLAGS override the run's config, its folder, its flags
# (e.g. --set sensitivity.draws=3) and the benchmark's flags.
DEPLOY_CONFIG ?= benchmarks/deploy_bbc.toml
DEPLOY_RUN ?= runs/bbc-deploy
DEPLOY_PLANS := uniform-8 uniform-4 uniform-2 mixed-2-4
DEPLOY_RUN_FLAGS ?=
DEPLOY_FLAGS ?= --bert-base --task bbc-news
bench-deploy: $(STAMP) runs/bbc/checkpoint/metrics.json
	$(VENV)/bin/qbert-hessian run $(DEPLOY_CONFIG) --out $(DEPLOY_RUN) $(DEPLOY_RUN_FLAGS)
	$(PY) benchmarks/bench_deploy.py $(foreach p,$(DEPLOY_PLANS),--packed $(DEPLOY_RUN)/results/$(p)/packed) \
		$(DEPLOY_FLAGS)

style: $(STAMP)
	$(VENV)/bin/ruff format qbert_hessian tests benchmarks experiments notebooks
	$(VENV)/bin/ruff check --fix qbert_hessian tests benchmarks experiments notebooks

check: $(STAMP)
	$(VENV)/bin/ruff check qbert_hessian tests benchmarks experiments notebooks
	$(VENV)/bin/ruff format --check qbert_hessian tests benchmarks experiments notebooks

clean:
	rm -rf $(VENV) runs .pytest_cache
