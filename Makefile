# One-file entry: `make demo` and `make test` work on a fresh machine with only Python 3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_output
PYTEST_ARGS ?=
# The one source of the version: the package's own.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' brainage_xai/_version.py)
IMAGE ?= brainage-xai/brainage-xai
DOCKER_ARGS ?=
DOCKER_TAG_SUFFIX ?=

.PHONY: help venv install test demo lint docker singularity clean

help:
	@echo "make demo   - set up a virtual environment, install, run the demo on the synthetic cohort"
	@echo "make test   - same set-up, then run the test suite"
	@echo "make lint   - ruff"
	@echo "make docker - build the Docker image $(IMAGE):$(VERSION)"
	@echo "make singularity - build brainage-xai-$(VERSION).sif from that image (Apptainer)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

venv: $(BIN)/python
install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/brainage-xai-demo $(DEMO_DIR)

lint: install
	$(BIN)/ruff check brainage_xai tests benchmarks

docker:
	docker build --build-arg VERSION=$(VERSION) $(DOCKER_ARGS) -t $(IMAGE):$(VERSION)$(DOCKER_TAG_SUFFIX) .

# From the Docker image built by `make docker` on this machine (Bootstrap: docker-daemon).
singularity:
	apptainer build --build-arg VERSION=$(VERSION) brainage-xai-$(VERSION).sif singularity.def

clean:
	rm -rf $(VENV) build *.egg-info
