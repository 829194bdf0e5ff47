# The targets the README and CI run. PYTHON is the interpreter used to create the virtualenv.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/senteval6.yaml

.PHONY: install test test-integration test-all lint format train clean images image-smoke \
	image-smoke-serve image-smoke-train

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, pinned: on this project's machines torch==2.13.0 resolves to a CPU build from
# the local wheel directory pip is configured with; elsewhere install the CPU wheel into
# $(VENV) first (README, Quickstart), or the project's range may pull a multi-GB CUDA build.
# The system packages the tests need have no target here: see .ci/run (apt-get line).
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[train,serve,dev]"
	touch $@

# Fast, offline tests (the default tier).
test: install
	$(BIN)/pytest -q

# Real Ray clusters on this machine (slower; CI runs them too).
test-integration: install
	$(BIN)/pytest -q -m integration

test-all: test test-integration

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The main job: train on the six SentEval tasks, evaluate the run on dev, export it, serve it
# over HTTP and send one query.
train: install
	$(BIN)/polytask train $(CONFIG)
	$(BIN)/polytask evaluate runs/latest --split dev --output runs/latest/eval_dev.json
	$(BIN)/polytask export runs/latest | tee runs/latest/export.log
	$(BIN)/python scripts/serve_query.py --model $$(sed -n 's/^model tag: //p' runs/latest/export.log) \
	  "a gripping , funny and moving film ." "what is the capital of peru ?"

# The Dockerfile's images, built with buildah on a local Debian base made with mmdebstrap (no
# Docker daemon, no registry; IMAGE_BASE=registry builds on the Dockerfile's own bases). Prints
# sizes and build times. `make images IMAGES=serve` builds one. Needs root, buildah, mmdebstrap.
IMAGES ?= serve train
images:
	infra/images/build.sh $(IMAGES)

# Smoke tests of the built images (infra/images/smoke.py; loopback only, everything stopped at
# the end). image-smoke: the train image validates, trains and exports a tiny model into a
# store, which the serve image then serves (CI runs `make images image-smoke`, .ci/run).
# image-smoke-serve: the serve image on a tiny store made here. image-smoke-train: the train
# image alone.
# Only image-smoke-serve needs the virtualenv (it trains the tiny model on this machine).
SMOKE_STORE := infra/images/build/smoke-store
image-smoke:
	$(PYTHON) infra/images/smoke.py train --store $(SMOKE_STORE)
	$(PYTHON) infra/images/smoke.py serve --store $(SMOKE_STORE)

image-smoke-serve: install
	$(BIN)/python infra/images/smoke.py serve

image-smoke-train:
	$(PYTHON) infra/images/smoke.py train

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
