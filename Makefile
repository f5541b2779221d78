# Set-up and main jobs. Every target creates what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pins that install from this kind of machine's local wheel cache;
# override on other machines, e.g. make TORCH="torch torchvision" ...
TORCH  ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Fashion-MNIST: Debian's dataset-fashion-mnist package where apt may install it
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist', or set data.root to a"; \
	  echo "directory with the four IDX .gz files, or add data.download=true where the network allows."; \
	fi

demo: setup data
	$(VENV)/bin/tailaug run configs/fmnist_lt/demo.yaml

test: setup
	$(PY) -m pytest

bench: setup data
	$(PY) benchmarks/stage1_speed.py
	$(PY) benchmarks/fmnist_lt.py

clean:
	rm -rf runs benchmarks/out
