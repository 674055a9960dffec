# The two commands of the README. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing compressor and its dependencies into $(VENV) (the first time takes a few minutes)..."
	$(PY) -m pip install -qq -e '.[test]'
	@touch $(STAMP)

# Prune the bundled ResNet-20 (trained on Fashion-MNIST) to half its FLOPs, fine-tune, export, validate.
demo: $(STAMP)
	$(VENV)/bin/compress models/demo/resnet20_fmnist.pt --arch resnet20 \
		--data models/demo/fmnist_sample.npz --mean 0.2860 --std 0.3530 \
		--target-flops 0.5 --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4

clean:
	rm -rf runs build *.egg-info
