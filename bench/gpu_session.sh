#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call: install, the GPU tests, both benchmarks.
# Results land in bench/results/ and, when $OUT is set (the device tool), are copied there.
# Usage (repo root, on the GPU machine): bash bench/gpu_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -e . --no-deps --no-build-isolation -q || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
status=0
python3 -m pytest -q -m gpu tests 2>&1 | tee bench/results/gpu-tests.log || status=1
python3 bench/sampler.py || status=1
python3 bench/decode.py || status=1
if [ -n "${OUT:-}" ]; then cp bench/results/*.json bench/results/*.png bench/results/gpu-tests.log "$OUT"/ 2>/dev/null; fi
exit $status
