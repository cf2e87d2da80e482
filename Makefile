# AnchorRT. Every target sets up what it needs: a virtual environment in .venv with the CPU build of torch.
# The system interpreter where there is one: Triton's Python-backend stub (`anchorrt serve`, tests marked serve) links
# the system libpython, and a venv from another build of the same Python version fails under it.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# Every recipe runs with the project's environment first on PATH: tools and tests that call `python` or
# `anchorrt` get .venv's, never whatever interpreter the machine has.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install demo test test-all bench bench-peers lint clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build first (PyTorch's CPU index when it answers): a plain `torch` from PyPI is the CUDA build.
	scripts/install_torch.sh $(PY) $(TORCH)
	$(PY) -m pip install -q -e ".[export,cpu,dev,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py
	@echo "The CLI is .venv/bin/anchorrt: run 'source .venv/bin/activate' to have 'anchorrt' on PATH."

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
	$(PY) -m pip install -q -e ".[bench-peers]"
	# llama.cpp's GGUF converter ships in the llama-cpp-python sdist, not in its wheel
	test -n "$$(ls -d .bench/llama_cpp_python-* 2>/dev/null)" || ( mkdir -p .bench && \
	  $(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python -d .bench && \
	  tar xzf .bench/llama_cpp_python-*.tar.gz -C .bench )
	$(PY) scripts/bench_peers.py

lint: $(STAMP)
	$(PY) -m ruff check anchorrt exporter runtime graph_passes tests scripts samples

clean:
	rm -rf $(VENV) out .pytest_cache
