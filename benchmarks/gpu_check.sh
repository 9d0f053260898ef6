#!/usr/bin/env bash
# The one script a GPU machine runs: card and versions, build the extension with that machine's
# torch, the CUDA tests, every attention kernel candidate, `vitfast tune`, `vitfast bench`
# defaults, `vitfast bench kernels`, a short profile, ncu on the patch embedding; JSON, a plot, a
# trace and the logs go to ${OUT:-benchmarks/results/latest}: 8 files, what a device call returns at
# most (log, build.log, e2e JSON + plot, candidates, kernels, profile JSON + trace).
# What it needs there: an NVIDIA GPU, python3 with torch >= 2.11 (a CUDA build), triton >= 3.6,
# timm, pytest (pytest-xdist not needed); nvcc for the build; no network. Afterwards: copy the JSON
# into benchmarks/results/, run `python benchmarks/render_readme.py` and commit (CONTRIBUTING.md,
# "Running the GPU check"). The summary table is printed last (a remote run returns only the tail
# of the output; benchmarks/gpu_summary.py prints the results part).
#
#   bash benchmarks/gpu_check.sh                       # from the repository root: the first call
#   SKIP_BUILD=1 SKIP_TESTS=1 bash benchmarks/gpu_check.sh
#   BENCH_ARGS="--compile" bash benchmarks/gpu_check.sh
#   ONLY=build,kernels,ncu DEADLINE=200 bash benchmarks/gpu_check.sh   # a second call, printed by the first
#
# One device call: a task gets 15 minutes of device time in all, start-up (1-2 min) included, and
# one command runs at most 600 s, so the script is sized for ONE call with timeout_s about 580:
# DEADLINE (540 s) is when the last step is stopped (a step's limit is cut to what is left; then
# at most 10 s more for it to stop, and the summary). The steps run in the order below, most wanted
# first: build, info, tests, candidates, tune, bench, kernels, profile, ncu. A step that would get
# less than its MIN_<STEP> seconds before DEADLINE is SKIPPED; tune and bench go together (the bench
# runs with the tuned table: tune does not start unless 2 x T_TUNE + MIN_BENCH seconds are left).
# The summary then prints the exact command (ONLY=...) for the skipped steps and for those whose
# limit DEADLINE cut and that then timed out; run it AT ONCE, as a second call on the still-warm
# machine (on a fresh one the build reruns, ~45 s, and the tune cache is gone: so whenever bench is
# in that list, tune is too). ONLY (comma-separated step names) runs just those; SKIP_<STEP> leaves
# one out. The tune step's cache (TUNE_CACHE, default .gpu_check/dispatch_tuned.json, an ignored
# path; its entries are printed in the log, not copied into OUT) is what the bench step runs with.
#
# The tests step runs the `cuda` tests as SHARDS (12) parallel pytest processes (each with
# VITFAST_TEST_SHARD=i/SHARDS: tests/_sharding.py; launched by benchmarks/gpu_test_shards.py), the
# tests named by TESTS_FIRST first (default tests/ops/test_attention.py,tests/ops; empty: file
# order), each shard's log in TEST_LOGS (.gpu_check/tests) and printed into the log; ok only if
# every shard passed. Triton's compiles dominate these tests and are CPU-bound; the machine has 16
# cores. At the step's limit every shard gets SIGINT and still prints its failures and summary.
#
# Environment: OUT, PYTHON (python3), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0), ONLY, SKIP_BUILD,
# SKIP_INFO, SKIP_TESTS, SKIP_CANDIDATES, SKIP_TUNE, SKIP_BENCH, SKIP_KERNELS, SKIP_PROFILE,
# SKIP_NCU, SHARDS, TESTS_FIRST, TEST_LOGS, TUNE_CACHE, CANDIDATE_ARGS, BENCH_ARGS, KERNEL_ARGS,
# PATCH_EMBED_ARGS (default "--models vit_base_patch16_224"); step limits in seconds T_BUILD (180)
# T_INFO (60) T_TESTS (120) T_CANDIDATES (120) T_TUNE (40, each of two) T_BENCH (180) T_KERNELS
# (300) T_PROFILE (45) T_NCU (60); the least time worth starting a step with, MIN_BUILD (15)
# MIN_INFO (15) MIN_TESTS (30) MIN_CANDIDATES (90) MIN_TUNE (30) MIN_BENCH (110) MIN_KERNELS (150)
# MIN_PROFILE (30) MIN_NCU (30); DEADLINE (540).
#
# Measured on an H200 (2026-11-30 and 12-01, torch 2.11, triton 3.6): versions ~12 s, build 43-48 s,
# info 7-8 s, tests (serial) 24 of ~330 `cuda` tests in 92 s before their 95 s limit, candidates
# 174 s with --deadline 151 (27 s of it compiling 224 kernels on 16 processes), bench 98 s, kernels
# (patch_embed + fused + memory) ~100 s; attention autotuning all configs of three kernels did not
# finish one shape in 60 s, hence the candidates step (parallel precompile, then timing) and
# attention left out of `bench kernels`. Estimated, not measured: the 12 test shards (12 of the 16
# cores compiling; all ~330 tests would take ~22 min serially at the measured rate, so even 12 shards may
# not finish them in T_TESTS: the attention and ops tests run first), tune (its two limits), profile, ncu, the patch_embed microbenchmark with
# the fused kernel since 2026-12-01 (~60-90 s more: its compiles, hence 150 s per microbenchmark and
# T_KERNELS 300), a no-op build on a warm machine. So a first call runs, by estimate: versions, build,
# info ~70 s; tests to ~190 s; candidates to ~310 s; tune to ~390 s; bench to ~490 s; kernels is
# skipped (MIN_KERNELS); profile in what is left; ncu skipped: the second call is then
# ONLY=build,kernels,ncu (and profile, if it was cut short and timed out).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-benchmarks/results/latest}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
# let tee write the last lines (the summary) before the script ends
finish() { exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null; }
trap finish EXIT
export PYTHONUNBUFFERED=1

STEPS=(build info tests candidates tune bench kernels profile ncu)
declare -a SUMMARY=()
declare -a DEFERRED=()
# want STEP: STEP is in ONLY (or ONLY is empty) and SKIP_<STEP> is not set
want() {
    local skip="SKIP_${1^^}"
    [ -z "${!skip:-}" ] || return 1
    [ -z "${ONLY:-}" ] || [[ ",${ONLY// /}," == *",$1,"* ]]
}
T0=$SECONDS
DEADLINE=${DEADLINE:-540}
TUNE_CACHE=${TUNE_CACHE:-.gpu_check/dispatch_tuned.json}

note() { SUMMARY+=("$(printf '%-10s %-7s %4ss  %s' "$1" "$2" "$3" "$4")"); }
banner() { printf '\n===== %s  (t=%ss)\n' "$1" "$((SECONDS - T0))"; }
left() { echo $((DEADLINE - (SECONDS - T0))); }
# min STEP DEFAULT: the least time worth starting STEP with: MIN_<STEP>, else DEFAULT
min() { local v="MIN_${1^^}"; echo "${!v:-$2}"; }
deferred() { [[ " ${DEFERRED[*]} " == *" $1 "* ]]; }
# defer NAME: NAME was not run (or was cut short) in this call; the summary lists its step for the next
defer() {
    local step=${1%%-*}
    deferred "$step" || DEFERRED+=("$step")
}

# run_step NAME LIMIT MIN CMD...: runs CMD under `timeout`, records ok/FAILED/TIMEOUT and the time.
# No step runs past DEADLINE seconds from the start, so the summary always gets printed: a step
# with less than MIN seconds left is skipped, a longer LIMIT is cut to what is left, and a step so
# cut that times out is listed for the second call as well.
run_step() {
    local name=$1 limit=$2 min=$3 t=$SECONDS rc left cut=""
    shift 3
    left=$(left)
    if [ "$left" -lt "$min" ]; then
        note "$name" SKIPPED 0 "needs ${min}s, ${left}s left before DEADLINE=${DEADLINE}s"
        defer "$name"
        return 1
    fi
    if [ "$limit" -gt "$left" ]; then
        limit=$left
        cut=", cut by DEADLINE=${DEADLINE}s"
    fi
    banner "$name (limit ${limit}s${cut}): $*"
    # SIGINT first: pytest then still prints the failures so far, a benchmark keeps its saved rows
    timeout -s INT --kill-after=10 "$limit" "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        note "$name" ok "$((SECONDS - t))" ""
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note "$name" TIMEOUT "$((SECONDS - t))" "stopped after ${limit}s$cut"
        [ -z "$cut" ] || defer "$name"
    else
        note "$name" FAILED "$((SECONDS - t))" "exit code $rc (see the log)"
    fi
    return "$rc"
}

print_summary() {
    banner "summary"
    "$PYTHON" benchmarks/gpu_summary.py "$OUT" || echo "(no results summary: benchmarks/gpu_summary.py failed)"
    printf '\n%-10s %-7s %5s  %s\n' step status time note
    printf '%s\n' "${SUMMARY[@]}"
    echo "results in $OUT (log: $LOG), total $((SECONDS - T0))s"
    if [ "${#DEFERRED[@]}" -gt 0 ]; then
        # a fresh machine has lost the tune cache: the bench needs its tune again
        if deferred bench && want tune && ! deferred tune; then DEFERRED+=(tune); fi
        local rest=build step
        for step in "${STEPS[@]:1}"; do deferred "$step" && rest+=",$step"; done
        echo "NOT RUN or cut short (DEADLINE=${DEADLINE}s): ${rest#build,}. Run them AT ONCE, in a second call on the"
        echo "still-warm machine (its build is then a no-op; a fresh machine rebuilds, ~45 s, and has no tune cache):"
        echo "  ONLY=$rest bash benchmarks/gpu_check.sh"
        echo "with DEADLINE= the device seconds left less ~60 s, and the call's timeout_s ~40 s above DEADLINE."
    fi
}

# ---- 1. the card, the versions, the build
banner "device and versions"
nvidia-smi -L || echo "nvidia-smi not found"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE VISIBLE')"
"$PYTHON" -c "import timm; print('timm', timm.__version__)" || echo "timm not installed: the timm baseline will be missing"

if want build; then
    export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    banner "build (MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; output in $OUT/build.log)"
    if ! run_step build "${T_BUILD:-180}" "$(min build 15)" \
            "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
        deferred build && { print_summary; exit 1; }
        tail -n 40 "$OUT/build.log"
        echo
        echo "BUILD FAILED: the vitfast extension did not build with this machine's torch; nothing else was run."
        echo "Full build output: $OUT/build.log"
        SUMMARY+=("(build output: $OUT/build.log)")
        print_summary
        exit 1
    fi
    tail -n 3 "$OUT/build.log"
fi
want info && { run_step info "${T_INFO:-60}" "$(min info 15)" "$PYTHON" -m vitfast.cli info || true; }

# ---- 2. the tests that need a GPU, as SHARDS parallel pytest processes (gpu_test_shards.py)
# Autotuning off here (each attention kernel launches its first surviving config): the
# candidates step below checks every config's numerics, and tests then spend no minutes compiling.
if want tests; then
    run_step tests "${T_TESTS:-120}" "$(min tests 30)" env VITFAST_ATTENTION_AUTOTUNE=0 \
        VITFAST_TEST_FIRST="${TESTS_FIRST-tests/ops/test_attention.py,tests/ops}" \
        "$PYTHON" benchmarks/gpu_test_shards.py --shards "${SHARDS:-12}" --logs "${TEST_LOGS:-.gpu_check/tests}" -- \
        -m cuda -q -rfE --durations=10 -p no:cacheprovider tests || true
fi

# ---- 2b. every attention kernel candidate (each autotune survivor of the forward variants, pointer,
# TMA and persistent TMA, of dK/dV, dQ and the 5-matmul backward, deterministic "fused" and "atomic" and
# their TMA twins "tma" and "tma_atomic", timed
# alone and checked against float32), then the autotuned kernel beside SDPA's flash, efficient and
# cuDNN backends: the data the configs and variants are pruned by (issue: every GPU run a full
# experiment). The script stops starting shapes 30 s before its limit and saves after each shape.
if want candidates; then
    t_cand=${T_CANDIDATES:-120}
    [ "$t_cand" -gt "$(left)" ] && t_cand=$(left)
    # shellcheck disable=SC2086
    run_step candidates "$t_cand" "$(min candidates 90)" "$PYTHON" -m vitfast.cli.kernels.attention_candidates \
        --json "$OUT/" --deadline "$((t_cand > 60 ? t_cand - 30 : t_cand / 2))" ${CANDIDATE_ARGS:-} || true
fi

# ---- 2c. the measured dispatch: `vitfast tune` at ViT-B/16, batch 256, bf16, inference then training,
# into a cache the bench step below then runs with (its FastViT rows are "FastViT (table)" and
# record each op's path). VITFAST_GELU_EPILOGUE=1 here only, so that the inference tune also times
# cuBLASLt's tanh-GELU epilogue for fc1 (op linear_bias_gelu); the exact-GELU models of the bench
# never take it (it needs the same opt-in there). Each entry is printed with both timings and
# written to the cache as soon as it is measured (a tune stopped at its limit keeps those).
# Tune and bench go together: without time for both, both wait for the second call.
T_TUNE=${T_TUNE:-40}
if want tune && want bench && [ "$(left)" -lt $((2 * T_TUNE + $(min bench 110))) ]; then
    reason="tune + bench need 2x${T_TUNE}s + $(min bench 110)s, $(left)s left before DEADLINE=${DEADLINE}s"
    note tune SKIPPED 0 "$reason"
    note bench SKIPPED 0 "$reason"
    defer tune
    defer bench
elif want tune; then
    mkdir -p "$(dirname "$TUNE_CACHE")"
    rm -f "$TUNE_CACHE"
    run_step tune-inf "$T_TUNE" "$(min tune 30)" env VITFAST_DISPATCH_CACHE="$TUNE_CACHE" VITFAST_GELU_EPILOGUE=1 \
        "$PYTHON" -m vitfast.cli tune --model vit_base_patch16_224 --batch-size 256 --dtype bf16 --iters 20 || true
    run_step tune-trn "$T_TUNE" "$(min tune 30)" env VITFAST_DISPATCH_CACHE="$TUNE_CACHE" \
        "$PYTHON" -m vitfast.cli tune --model vit_base_patch16_224 --batch-size 256 --dtype bf16 --iters 20 --train || true
fi
# the bench runs with the tuned table, whether this call or an earlier one on this machine tuned
[ -f "$TUNE_CACHE" ] && export VITFAST_DISPATCH_CACHE="$TUNE_CACHE"

# ---- 3. end-to-end benchmark (GPU defaults: ViT-S/B/L at 224, bf16, batch 256, infer + train)
# BENCH_ARGS is split into words on purpose (extra options)
if want bench && ! deferred bench; then
    # shellcheck disable=SC2086
    run_step bench "${T_BENCH:-180}" "$(min bench 110)" "$PYTHON" -m vitfast.cli bench --no-progress \
        --json "$OUT/" --plot "$OUT/e2e_throughput.png" ${BENCH_ARGS:-} || true
fi

# ---- 4. kernel microbenchmarks
if want kernels; then
    # each microbenchmark gets its own limit, and the rows are saved after each one
    # shellcheck disable=SC2086
    run_step kernels "${T_KERNELS:-300}" "$(min kernels 150)" "$PYTHON" -m vitfast.cli bench kernels --json "$OUT/" \
        --timeout 150 "--patch-embed-args=${PATCH_EMBED_ARGS---models vit_base_patch16_224}" \
        ${KERNEL_ARGS---only patch_embed fused memory} || true
fi

# ---- 5. a short profile: the CUDA profiler path, a trace, the ncu command line
if want profile; then
    run_step profile "${T_PROFILE:-45}" "$(min profile 30)" "$PYTHON" -m vitfast.cli profile \
        --model vit_base_patch16_224 --batch-size 64 --steps 2 --top 10 \
        --trace "$OUT/trace_vit_base_patch16_224.json.gz" --json "$OUT/" --ncu || true
fi

# ---- 6. the CUDA patch embedding under ncu: shared-memory bank conflicts, DRAM bytes and time of
# each patchify/unpatchify/prefill kernel of the C++ path (uint8 and bf16, NCHW and channels_last,
# forward + backward)
if want ncu; then
    if command -v ncu >/dev/null; then
        run_step ncu "${T_NCU:-60}" "$(min ncu 30)" ncu --clock-control none -k "regex:patchify|prefill" --metrics \
            l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
            "$PYTHON" benchmarks/patch_embed_ncu.py || true
    else
        note ncu SKIPPED 0 "ncu is not on PATH"
    fi
fi

print_summary
