# One entry point for set-up and every routine job. The virtual environment is created on first
# use (VENV, default .venv) with torch pinned through constraints.txt, so a CPU machine never
# downloads CUDA wheels.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export MPLBACKEND := Agg
export HF_HUB_OFFLINE := 1
# Material for MkDocs prints a banner about its successor on every build.
export NO_MKDOCS_2_WARNING := 1
# The real data (Omniglot, the CUB subset, MobileNetV2 weights) beside the repository unless set.
export DMLKIT_DATA ?= $(abspath ../shared/data)

.PHONY: setup train demo test test-umap lint docs bench bench-gpu bench-class-losses bench-eval bench-train bench-ddtas bench-protocol \
	bench-sweep

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/dmlkit train

demo: setup
	$(BIN)/python examples/demo.py

lint: setup
	$(BIN)/ruff check src tests benchmarks examples scripts
	$(BIN)/ruff format --check src tests benchmarks examples scripts
	$(BIN)/mypy

# UMAP's first fit costs about 40 s of numba JIT in every process: its tests run apart, in one.
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadgroup -q -m "not umap"

test-umap: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m umap

# The documentation site, with the API reference from the docstrings; --strict fails on broken
# links, missing references and docstring problems.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir build/site

bench: setup
	$(BIN)/python benchmarks/losses.py

# The device check to run whenever a GPU is lent (under 8 minutes on one H100/H200): device tests,
# losses, evaluation at 1M items, training images/s, into benchmarks/results/gpu/.
# DEVICE=cpu runs it at small sizes (the test suite does, so it cannot rot).
DEVICE ?= cuda
bench-gpu: setup
	$(BIN)/python benchmarks/gpu_check.py --device $(DEVICE) $(if $(filter cpu,$(DEVICE)),--small --out build/gpu_check_cpu,)

# Losses with per-class parameters (proxies, class weights) against PML and a bare x @ W.
bench-class-losses: setup
	$(BIN)/python benchmarks/class_losses.py

bench-eval: setup
	$(BIN)/python benchmarks/evaluation.py

bench-train: setup
	$(BIN)/python benchmarks/training.py

bench-ddtas: setup
	$(BIN)/python benchmarks/ddtas_cost.py
	$(BIN)/python benchmarks/ddtas_ablation.py

# The study, its runs and checkpoints stay in build/; only the tables and plots are kept.
bench-protocol: setup
	$(BIN)/dmlkit bench digits --out build/bench-digits
	$(BIN)/dmlkit report build/bench-digits
	mkdir -p benchmarks/results/protocol_digits
	cp build/bench-digits/results.* build/bench-digits/plots/*_history.png \
	  build/bench-digits/report.html benchmarks/results/protocol_digits/

# Margin sensitivity of the triplet and circle losses on CUB (cached MobileNetV2 features, a
# linear head): 7 margins × 3 seeds each. Runs stay in build/; tables, plots and reports are kept.
SWEEP := $(BIN)/dmlkit sweep configs/cub100_subset.yaml --values 0.4:1.0:0.1 --seeds 3 \
	--set miner.name=null --set logging.progress=false
bench-sweep: setup
	$(SWEEP) --param loss.options.margin --set loss.name=TripletMarginLoss --out build/sweep-triplet
	$(SWEEP) --param loss.options.m --set loss.name=CircleLoss --out build/sweep-circle
	for name in triplet circle; do \
	  $(BIN)/dmlkit report build/sweep-$$name && \
	  mkdir -p benchmarks/results/sweep_cub100_$$name && \
	  cp build/sweep-$$name/sweep.* build/sweep-$$name/report.html \
	    build/sweep-$$name/plots/sweep.png benchmarks/results/sweep_cub100_$$name/ || exit 1; \
	done
