# One entry point for set-up, the default run and the tests.
#   make demo   create .venv, install everything, run the default distillation run
#   make test   same set-up, then the test suite (slow tests excluded)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test test-slow data clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Debian ships real Fashion-MNIST; install it when the files are missing and apt is usable.
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian's dataset-fashion-mnist ..."; \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
	    || echo "warning: could not install dataset-fashion-mnist; tests that need it will fail"; \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null || echo "warning: could not install dataset-fashion-mnist"; \
	  else \
	    echo "warning: $(FASHION_MNIST_DIR) missing; install Debian's dataset-fashion-mnist or set REVIEWKD_FASHION_MNIST"; \
	  fi; \
	fi

	@if ! command -v espeak-ng >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing espeak-ng (the av_fashion_mnist set speaks its class names with it) ..."; \
	    (apt-get install -y -qq espeak-ng >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq espeak-ng >/dev/null)) \
	    || echo "warning: could not install espeak-ng; the av_fashion_mnist tests will be skipped"; \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    sudo apt-get install -y -qq espeak-ng >/dev/null || echo "warning: could not install espeak-ng"; \
	  else \
	    echo "warning: espeak-ng missing; install it (apt-get install espeak-ng) for the av_fashion_mnist set"; \
	  fi; \
	fi

demo: setup
	$(BIN)/reviewkd demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
