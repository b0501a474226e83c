#!/usr/bin/env bash
# Issue 12's measurements in one call of the device machine (run from the repository root there):
#   make gpu-wheels                       # here, once: the pinned wheels into .whl/ (about 20 MB)
#   device run, carry [".whl"], command "bash bench/gpu_device.sh", timeout 600
# Results come back under $OUT (the JSON, the profile table, the log, targets.md); copy them into docs/bench/.
set -uo pipefail
out="${OUT:-docs/bench}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD/packages:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$out/nvidia-smi.txt"
python3 -c 'import torch, transformers, pydantic; print("torch", torch.__version__, "transformers", transformers.__version__, "pydantic", pydantic.__version__)'
# 480 s of phases leaves the 600 s call room for the machine's own start and the model's build.
python3 -m bench.gpu_suite --out-dir "$out" --budget-s "${SUITE_BUDGET_S:-480}" "$@" 2>&1 | tee "$out/suite.log"
# The verdict on issue 12's targets, as the markdown for docs/benchmarks.md (printed last: the device tool
# returns the end of the output).
python3 -m bench.gpu_targets "$out/results-gpu-suite.json" | tee "$out/targets.md"
