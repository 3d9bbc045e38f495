# One-command set-up on a fresh Debian machine (Python 3.11, CPU): a virtualenv with the CPU build of
# torch, the Fashion-MNIST Debian package when missing (needs root), then the job.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup data demo test evidence clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pinned: here this resolves to a local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

data:
	@if [ ! -f $(FMNIST) ] && [ -z "$$PEERDISTILL_DATA" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (or set PEERDISTILL_DATA)"; \
	    exit 1; \
	  fi; \
	fi

# The main job: 2-peer DML of ResNet-14 on Fashion-MNIST (about 5 minutes on 2 CPU cores).
demo: setup data
	$(BIN)/peerdistill train --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# The suite, then its numerical tests (those comparing with an independent computation, marker `numerical`)
# again with every CPU kernel family forced to its portable path: float32 results differ between CPUs
# (AVX2 / AVX-512 / AMX kernels sum in other orders), and the tolerances must hold on all of them.
PORTABLE := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2

# First the layering contracts (pyproject.toml [tool.importlinter], docs/reference/design.md "Layers").
test: setup data
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest
	$(PORTABLE) $(BIN)/python -m pytest -m numerical

# Every study behind docs/RESULTS.md, then the document (hours on 2 cores; restartable: finished runs are kept).
evidence: setup data
	PATH=$(abspath $(BIN)):$$PATH studies/run_all.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
