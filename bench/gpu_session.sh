#!/usr/bin/env bash
# What a lent GPU machine runs, in stages that each fit one device call (10 minutes), so that a
# session of 30 device-minutes spends them on measurements. Results land in bench/results/ and,
# when $OUT is set (the device tool), are copied there as each stage ends (a stage cut short by
# its time limit still returns the rows it finished: bench/decode.py rewrites its JSON per row).
#
# Usage (repo root, on the GPU machine): bash bench/gpu_session.sh STAGE [STAGE ...]
#   kernels   install; GPU tests (pytest -m gpu, and the attention and layer kernel tests, which
#             run on CUDA tensors where a GPU exists); bench/sampler.py              (~3 min)
#   decode    bench/decode.py: HF generate and engine temperature/antidistill/permutation (~6 min)
#   jvp       bench/decode.py --append: engine temperature, exact-D jvp, low-rank jvp r8..r512 (~6 min);
#             on a fresh machine, first copy the decode stage's returned decode-*.json into bench/results/
#   all       the three in a row (more than one call's limit: for a machine of your own)
set -uo pipefail
export PYTHONUNBUFFERED=1
[ $# -ge 1 ] || { sed -n 2,13p "$0"; exit 2; }
python3 -m pip install -e . --no-deps --no-build-isolation -q || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p bench/results
status=0

collect() {
    if [ -n "${OUT:-}" ]; then
        cp bench/results/*.json bench/results/*.png bench/results/*.log "$OUT"/ 2>/dev/null || true
    fi
}

stage_kernels() {
    python3 -m pytest -q -m gpu tests 2>&1 | tee bench/results/gpu-tests.log || status=1
    python3 -m pytest -q tests/test_decode_attention.py tests/test_decode_attention_jvp.py \
        tests/test_rms_norm_kernel.py tests/test_silu_mul_kernel.py tests/test_rotary_cache_kernel.py 2>&1 \
        | tee -a bench/results/gpu-tests.log || status=1
    timeout 240 python3 bench/sampler.py 2>&1 | tee bench/results/sampler.log || status=1
}

stage_decode() {
    timeout 540 python3 bench/decode.py --variants hf_temperature hf_antidistill engine_temperature \
        engine_antidistill engine_permutation 2>&1 | tee bench/results/decode.log || status=1
}

stage_jvp() {
    timeout 540 python3 bench/decode.py --append --variants engine_temperature engine_jvp engine_jvp_lowrank \
        2>&1 | tee bench/results/decode-jvp.log || status=1
}

for stage in "$@"; do
    case "$stage" in
        kernels) stage_kernels ;;
        decode) stage_decode ;;
        jvp) stage_jvp ;;
        all) stage_kernels; collect; stage_decode; collect; stage_jvp ;;
        *) echo "unknown stage $stage (kernels, decode, jvp, all)"; exit 2 ;;
    esac
    collect
done
exit $status
