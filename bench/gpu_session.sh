#!/usr/bin/env bash
# What a lent GPU machine runs, in stages that each fit one device call (10 minutes). Results land
# in bench/results/ and, when $OUT is set (the device tool), are copied there as each stage ends;
# every step has its own time limit, so one that hangs or fails leaves the others their time
# (bench/decode.py rewrites its JSON per row: a step cut short still returns the rows it finished).
#
# Usage (repo root, on the GPU machine): bash bench/gpu_session.sh STAGE [STAGE ...]
# (The stages that ran in sessions 9-11, quick, followup, linear, pdl, defaults and stages, are in this
# file's history up to commit 23d241e; bench/results/README.md says which produced what.)
#   kernels   the whole test suite (the GPU tests, and the kernel tests on CUDA tensors instead of
#             the interpreter); bench/sampler.py at batch 1 to 64                       (~5 min)
#   sampler   the sampler's tests on the GPU, bench/sampler.py, the GPU tests of the linear kernel
#             (with its fused rotary, activation, norms and residual adds), the fused layers, the L2
#             prefetch and the engine, the engine's temperature and antidistillation rows at batch 1 and 32 (the
#             engine now draws with proxy_vocab_only from bf16 logits), at batch 1 with every linear
#             in the kernel (rows *_kernel: the activation and norms fused into it) and without the
#             fusions (*_kernel_unfused: their A/B), goals, the rows with
#             --prefetch-mb 24 (*_pf24), bench/sampler_tune.py over the plans with shared Philox
#             words (8 warps, block 2048) (~11.5 min of limits: a 590 s call keeps all but the last two)
#   levers    after sampler: Nsight Compute on the sampler at batch 64; decode attention against its
#             split size (bench/attention.py: one split per kv head at batch 1 today); the linear
#             kernel with swapped operands (the warpgroup MMA) and with more of its weight
#             prefetched before it waits, per layer at 1 and 32 rows (bench/linear.py --swap-sweep
#             --prefetch-sweep, linear_levers-<device>.json); engine temperature and
#             antidistillation rows with the L2 weight prefetch at 16 MB (batch 1 and 32), with every
#             linear in the kernel at batch 32 (its rotary and activation epilogues), and with swapped
#             operands and the norms inside it too, goals, a profile of temperature with the prefetch
#             (~10 min of limits: a 590 s call may cut the profile)
#   decode    bench/decode.py: HF generate and engine temperature/antidistill/permutation (~6 min)
#   jvp       bench/decode.py --append: engine temperature, exact-D jvp, low-rank jvp r8..r512 (~6 min);
#             on a fresh machine, first copy the returned decode-*.json into bench/results/
#   eps       bench/eps_sweep_random.py: eps curve of a random-weight Qwen2.5-3B-shaped proxy (~2 min)
#   profile   bench/profile_step.py: where the step's time goes, each engine variant at batch 1 and 32 (~6 min)
#   all       kernels, decode, jvp, eps and profile in a row (more than one call's limit: for a machine of your own)
# Plots (PNG) are drawn where matplotlib is installed (the GPU image has it) and come back with the
# JSON; --plot-only (see each script) redraws them from the JSON elsewhere.
set -uo pipefail
export PYTHONUNBUFFERED=1
[ $# -ge 1 ] || { sed -n 2,36p "$0"; exit 2; }
python3 -m pip install -e . --no-deps --no-build-isolation -q || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p bench/results
status=0

started=$(mktemp)  # results written after this are this session's

# collect: the files this session wrote under bench/results, as one archive in $OUT (the device tool
# returns at most 8 files), and the goals tables beside it to read at once.
collect() {
    if [ -n "${OUT:-}" ]; then
        local part="$OUT/partial.tgz"  # written aside, then renamed: $OUT always holds a whole archive
        find bench/results -type f -newer "$started" -printf '%P\n' | tar czf "$part" -C bench/results -T - \
            && mv "$part" "$OUT/results.tgz"
        cp bench/results/goals-*.md "$OUT"/ 2>/dev/null || true
    fi
}

# step SECONDS LOG COMMAND...: run COMMAND under a time limit, appending its output to bench/results/LOG.
step() {
    local seconds=$1 log=bench/results/$2
    shift 2
    echo "== $* (limit ${seconds} s)" | tee -a "$log"
    timeout "$seconds" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== exit $rc: $*" | tee -a "$log"; status=1; }
    collect
    return "$rc"
}

stage_kernels() {
    step 360 gpu-tests.log python3 -m pytest -q -n 8 --dist loadfile tests
    step 200 sampler.log python3 bench/sampler.py
}

stage_sampler() {  # most important first: a call cut short keeps what came before
    step 70 gpu-tests.log python3 -m pytest -q -n 8 --tb=short tests/test_sampling.py
    step 30 sampler.log python3 bench/sampler.py
    step 180 gpu-tests.log python3 -m pytest -q -n 8 --tb=short tests/test_decode_linear_kernel.py \
        tests/test_layer_ops.py tests/test_l2_prefetch_kernel.py tests/test_engine.py
    step 110 decode.log python3 bench/decode.py --append --batches 1 32 --variants engine_temperature \
        engine_antidistill
    # every linear in the kernel, which at batch 1 also runs the activation and the norms, and the
    # same with those in their own kernels (the fusions' A/B, one run apart)
    step 70 decode.log python3 bench/decode.py --append --batches 1 --linear kernel --variants \
        engine_temperature engine_antidistill
    step 70 decode.log python3 bench/decode.py --append --batches 1 --linear kernel --no-linear-fusions \
        --variants engine_temperature engine_antidistill
    step 10 goals.log python3 bench/goals.py
    step 110 decode.log python3 bench/decode.py --append --batches 1 32 --prefetch-mb 24 --variants \
        engine_temperature engine_antidistill
    step 45 sampler.log python3 bench/sampler_tune.py --blocks 2048 --warps 8 --programs-per-sm 2 4 --stages 1 3
}

stage_levers() {  # after sampler: the step's settings not yet measured, each a run of its own
    sampler_ncu sampler-ncu-grouped-B64
    step 90 attention.log python3 bench/attention.py
    step 150 linear.log python3 bench/linear.py --rows 1 32 --swap-sweep --prefetch-sweep --stem linear_levers
    step 120 decode.log python3 bench/decode.py --append --batches 1 32 --prefetch-mb 16 --variants \
        engine_temperature engine_antidistill
    # every linear in the kernel at batch 32 (its rotary and activation epilogues), with the default
    # operand order, and with the weight tile leading (swap_ab) and the norms inside it too
    step 70 decode.log python3 bench/decode.py --append --batches 32 --linear kernel --variants \
        engine_temperature engine_antidistill
    step 70 decode.log python3 bench/decode.py --append --batches 32 --linear kernel --linear-swap \
        --linear-norm-rows 64 --variants engine_temperature engine_antidistill
    step 10 goals.log python3 bench/goals.py
    step 50 profile.log python3 bench/profile_step.py --variant engine_temperature --batch 1 --prefetch-mb 24
}

# sampler_ncu NAME: Nsight Compute's counters for one launch of the fused sampler's main kernel at
# batch 64 (issue 2's bandwidth goal): the details page and the per-SASS-line source page, as text,
# in bench/results/NAME-details.txt and NAME-sass.csv.gz.
sampler_ncu() {
    local rep=/tmp/$1
    command -v ncu >/dev/null || { echo "no ncu on this machine" | tee -a bench/results/sampler-ncu.log; return 0; }
    step 60 sampler-ncu.log ncu --clock-control none -k regex:_fused_sample_partials --launch-skip 2 \
        --launch-count 1 --set full --import-source yes -f -o "$rep" python3 bench/sampler_ncu.py --batch 64 \
        && { ncu -i "$rep.ncu-rep" --page details > "bench/results/$1-details.txt"
             ncu -i "$rep.ncu-rep" --page source --csv --print-source sass | gzip -9 > "bench/results/$1-sass.csv.gz"
             collect; }
}

stage_decode() {
    step 540 decode.log python3 bench/decode.py --append --variants hf_temperature hf_antidistill \
        engine_temperature engine_antidistill engine_permutation
}

stage_jvp() {
    step 540 decode-jvp.log python3 bench/decode.py --append --variants engine_temperature engine_jvp \
        engine_jvp_lowrank
}

stage_eps() {
    step 300 eps-random.log python3 bench/eps_sweep_random.py
}

stage_profile() {
    for variant in engine_temperature engine_antidistill engine_jvp engine_jvp_lowrank; do
        for batch in 1 32; do
            step 80 profile.log python3 bench/profile_step.py --variant $variant --batch $batch
        done
    done
}

for stage in "$@"; do
    case "$stage" in
        kernels) stage_kernels ;;
        sampler) stage_sampler ;;
        levers) stage_levers ;;
        decode) stage_decode ;;
        jvp) stage_jvp ;;
        eps) stage_eps ;;
        profile) stage_profile ;;
        all) stage_kernels; stage_decode; stage_jvp; stage_eps; stage_profile; step 10 goals.log python3 bench/goals.py ;;
        *) echo "unknown stage $stage (sampler, levers, kernels, decode, jvp, eps, profile, all)"; exit 2 ;;
    esac
done
exit $status
