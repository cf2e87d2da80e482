# AnchorRT. Every target sets up what it needs: a virtual environment in .venv with the CPU build of torch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: install demo test test-all bench bench-peers lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build first: a plain `torch` requirement would pull several GB of CUDA packages.
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[export,cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_foundation.py
	$(PY) scripts/bench_mitigation.py
	$(PY) scripts/bench_iava.py --threads 1
	$(PY) scripts/soak.py --generations 1000

# AnchorRT vs ONNX Runtime GenAI, llama.cpp and transformers on the issue-18 bench model (not part of `make test`);
# peers come from `pip install -e ".[bench-peers]"`, a missing one is reported and left out.
bench-peers: $(STAMP)
	$(PY) scripts/bench_peers.py

lint: $(STAMP)
	$(PY) -m ruff check anchorrt exporter runtime graph_passes tests scripts samples

clean:
	rm -rf $(VENV) out .pytest_cache
