# Two commands do all set-up on a fresh clone: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
export PYTHONPATH := $(CURDIR)/packages:$(CURDIR)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv serve test bench bench-peer bench-per-token eval tiny-model gpu-wheels clean

# Rebuilt when the pins change. Truss's server needs its own requirements (as its Docker image
# installs them), bounded by its constraints file; its `-i` line is dropped so pip's configured
# indexes are used.
# Then the project itself, editable (pyproject.toml): starcoder_serving, devtools, bench and evals import from the
# venv's python without PYTHONPATH.
$(VENV)/.installed: requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	server=$$($(PY) -c 'import pathlib, truss; print(pathlib.Path(truss.__file__).parent / "templates/server")') && \
	  grep -v '^-i ' "$$server/requirements.txt" > $(VENV)/truss-server-requirements.txt && \
	  $(PY) -m pip install --quiet -r $(VENV)/truss-server-requirements.txt -c "$$server/constraints.txt" -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

tiny-model: venv
	$(PY) -m devtools.tiny_model .cache/tiny-starcoder

# The real Truss server on 127.0.0.1:$(PORT), ready when GET /v1/models/model answers 200; Ctrl-C stops it (exit 0).
# STARCODER_CHECKPOINT=<path or hub id> serves another model (CUDA in bfloat16 with a GPU, else the CPU in float32).
serve: venv
	exec env PORT=$(PORT) $(PY) -m devtools.truss_local

test: venv
	$(PY) -m pytest

# Results under .cache/bench/results/ (untracked); BENCH_ARGS="--label NAME" writes docs/bench/results-NAME.json.
bench: venv
	$(PY) -m bench.run $(BENCH_ARGS)

# Ours vs `transformers serve --continuous-batching` vs the seed on the tiny model (docs/benchmarks.md,
# "Peer comparison"); installs the peer into .cache/bench/peer-venv on first use. BENCH_ARGS="--quick": a fast check.
bench-peer: venv
	$(PY) -m bench.run --compare $(BENCH_ARGS)

# The engine's per-token cost in process, against plain generate() and the bare manager (bench/per_token.py).
bench-per-token: venv
	$(PY) -m bench.per_token $(BENCH_ARGS)

# HumanEval against a running server: `make serve` in another shell, or --base-url/--api-key for a deployment.
eval: venv
	$(PY) -m evals.humaneval --port $(PORT) $(EVAL_ARGS)

# The wheels the GPU machine needs for `bash bench/gpu_device.sh` (docs/benchmarks.md, "GPU"), into .whl/.
gpu-wheels:
	mkdir -p .whl
	grep -v '^#' bench/gpu-wheels.txt | xargs $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl

clean:
	rm -rf .cache .pytest_cache .hypothesis
