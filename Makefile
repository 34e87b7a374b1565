# Neighbor Diffusion: `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PRESET ?= cpu
MODEL  ?= models:/neighbor-diffusion@candidate
# `make demo STEPS=3000` trains longer than the preset's steps, as its own run (runs/neighbor-diffusion-3000)
STEPS  ?=
# `make demo BASE=1` starts from the text-only base that `make base` trains (runs/neighbor-diffusion-from-base)
BASE   ?=
BASE_FILE := runs/cpu-text-base/backbone.safetensors
RUN    := neighbor-diffusion$(if $(STEPS),-$(STEPS))$(if $(BASE),-from-base)
# The noisiest 10% of timesteps drawn 5x as often: on the base and on the run from it
TIMESTEP_BIAS := --diffusion.timestep_bias_portion 0.1 --diffusion.timestep_bias_multiplier 5
# From the base: neighbor gates open, neighbor layers at 5x the learning rate, and the timestep bias (near
# pure noise only the neighbors know the subject's colours)
FROM_BASE_FLAGS := --train.init_from $(BASE_FILE) --train.neighbor_gate_init 1.0 --train.neighbor_lr_scale 5 \
	$(TIMESTEP_BIAS)
SERVE_PORT ?= 8000
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# no "Loading weights" progress bar in the jobs' logs at each load of the text encoder
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONPATH := $(CURDIR)/platform:$(CURDIR)

.PHONY: setup demo base test test-all lint bench serve serve-loadtest mlflow-ui clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

# The main job end to end: subject-world crawl -> mined clusters -> training -> registered model
# -> the neighbor model's benchmark numbers beside the text-only baseline's, for the version just registered
# (also logged to that version in MLflow).
demo: setup
	$(if $(BASE),@test -f $(BASE_FILE) || { echo "make demo BASE=1: no $(BASE_FILE); run make base first"; exit 1; })
	$(PY) jobs/prepare_data.py --preset $(PRESET)
	$(PY) jobs/train.py --preset $(PRESET) --train.run_name $(RUN) $(if $(STEPS),--train.steps $(STEPS) --train.sample_every 1000) \
		$(if $(BASE),$(FROM_BASE_FLAGS))
	$(PY) jobs/evaluate.py --model models:/neighbor-diffusion@candidate --quick

# The text-only base for `make demo BASE=1` (its training job ~20 minutes on 2 cores): the `cpu` preset
# with the neighbors dropped in every example, so only the text-to-image backbone learns, and the noisiest
# 10% of timesteps drawn 5x as often (the scene from the prompt alone, in half the steps uniform ones take);
# its EMA UNet without the neighbor layers goes to $(BASE_FILE), with the command and commit in its metadata.
BASE_FLAGS := --train.steps 3000 --train.sample_every 1000 --train.checkpoint_every 1000 \
	--diffusion.p_drop_text 0.0 --diffusion.p_drop_neighbors 0.9 --diffusion.p_drop_both 0.1 $(TIMESTEP_BIAS)
base: setup
	$(PY) jobs/prepare_data.py --preset cpu
	$(PY) jobs/train.py --preset cpu --train.run_name cpu-text-base $(BASE_FLAGS) --no-register \
		--export-backbone $(BASE_FILE)

test: setup
	$(BIN)/pytest -q

test-all: setup
	$(BIN)/pytest -q -m ''

lint: setup
	$(BIN)/ruff check platform jobs serving tests infra bench
	$(BIN)/ruff format --check platform jobs serving tests infra bench

# Speed as ratios measured in one run (bench/run.py); results in bench/results/*.json and SUMMARY.md
bench: setup
	$(PY) bench/run.py --preset $(PRESET)

serve: setup
	$(PY) -m serving.app --preset $(PRESET) --serve.model_uri $(MODEL) --serve.port $(SERVE_PORT)

serve-loadtest: setup
	$(PY) -m serving.loadtest --out bench/results/serving_loadtest.json

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs data mlruns mlartifacts mlflow.db bench/results bench/data .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
