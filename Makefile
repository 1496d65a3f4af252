# make test / make demo / make bench: each enough on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gap-installed

.PHONY: install test demo bench gpu-check clean

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch, torchvision" 2>/dev/null; then \
	    echo "reusing the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch, torchvision" 2>/dev/null || \
	  $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[capture,test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/gap demo --out demo

bench: $(STAMP)
	$(PY) -m bench

# On a CUDA machine: capture overhead and causal sweep speedup for the real model shapes.
gpu-check: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/test_gpu.py
	$(PY) -m bench.gpu_capture

clean:
	rm -rf $(VENV) demo .pytest_cache
