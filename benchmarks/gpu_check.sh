#!/usr/bin/env bash
# The one script a GPU machine runs: card and versions, build the extension with that machine's
# torch, the CUDA tests, `vitfast bench` defaults, `vitfast bench kernels`, a short profile;
# JSON, a plot, a trace and the logs go to ${OUT:-benchmarks/results/latest}: 8 files, what a device
# call returns at most (log, build.log, e2e JSON + plot, candidates, kernels, profile JSON + trace).
# What it needs there: an NVIDIA GPU, python3 with torch >= 2.11 (a CUDA build), triton >= 3.6,
# timm, pytest; nvcc for the build; no network. Afterwards: copy the JSON into benchmarks/results/,
# run `python benchmarks/render_readme.py` and commit (CONTRIBUTING.md, "Running the GPU check").
# The summary table is printed last (a remote run returns only the tail of the output).
# Sized for < 7 minutes on one H100; each step has its own time limit and a failed step is
# reported in the summary without stopping the steps after it (a failed build does stop).
#
#   bash benchmarks/gpu_check.sh                       # from the repository root
#   SKIP_BUILD=1 SKIP_TESTS=1 bash benchmarks/gpu_check.sh
#   BENCH_ARGS="--compile" bash benchmarks/gpu_check.sh
#   ONLY=build,tune,bench,kernels,profile,ncu bash benchmarks/gpu_check.sh   # a second call
#
# The whole check does not fit one DEADLINE (see the timings below): the steps run most wanted
# first, a step that would start too close to DEADLINE is SKIPPED, and the summary then prints the
# exact command (ONLY=...) that runs the skipped steps in a second call. ONLY (comma-separated step
# names: build info tests candidates tune bench kernels profile ncu) runs just those; SKIP_<STEP>
# leaves one out. The tune step's cache (TUNE_CACHE, default .gpu_check/dispatch_tuned.json, an
# ignored path that stays on a warm machine between calls; its entries are printed in the log, not
# copied into OUT: at most 8 files come back from a device call) is what the bench step runs with,
# in the same call or the next.
#
# Environment: OUT, PYTHON (python3), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0), SKIP_BUILD,
# SKIP_TESTS, SKIP_CANDIDATES, SKIP_TUNE, SKIP_BENCH, SKIP_KERNELS, SKIP_PROFILE, SKIP_NCU, CANDIDATE_ARGS, BENCH_ARGS, KERNEL_ARGS, PATCH_EMBED_ARGS (default
# "--models vit_base_patch16_224"), step limits in seconds T_BUILD (180) T_TESTS (120)
# T_CANDIDATES (150) T_TUNE (40, each of two) T_BENCH (180) T_KERNELS (300) T_PROFILE (45) T_NCU (60), and DEADLINE (390): no step runs past it, so
# the summary prints by about 6.5 min. Measured on an H200 (2026-11-30, torch 2.11, triton 3.6):
# build 43 s, info 7 s, bench 98 s, kernels (patch_embed + fused + memory) ~100 s; attention
# autotuning all configs of three kernels did not finish one shape in 60 s, hence the
# candidates step (parallel precompile, then timing) and attention left out of `bench kernels`.
# Since the fused patch-embedding kernel (2026-12-01) the patch_embed microbenchmark also times it
# (autotuned, and each of its forward configs) and the three-kernel path: ~60-90 s more (a guess:
# its compiles), hence 150 s per microbenchmark and T_KERNELS 300.
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

declare -a SUMMARY=()
declare -a DEFERRED=()
# want STEP: STEP is in ONLY (or ONLY is empty) and SKIP_<STEP> is not set
want() {
    local skip="SKIP_${1^^}"
    [ -z "${!skip:-}" ] || return 1
    [ -z "${ONLY:-}" ] || [[ ",${ONLY// /}," == *",$1,"* ]]
}
T0=$SECONDS
DEADLINE=${DEADLINE:-390}

note() { SUMMARY+=("$(printf '%-10s %-7s %4ss  %s' "$1" "$2" "$3" "$4")"); }
banner() { printf '\n===== %s  (t=%ss)\n' "$1" "$((SECONDS - T0))"; }

# run_step NAME LIMIT CMD...: runs CMD under `timeout`, records ok/FAILED/TIMEOUT and the time.
# No step runs past DEADLINE seconds from the start, so the summary always gets printed.
run_step() {
    local name=$1 limit=$2 t=$SECONDS rc left
    shift 2
    left=$((DEADLINE - (SECONDS - T0)))
    if [ "$left" -lt 15 ]; then
        note "$name" SKIPPED 0 "no time left before DEADLINE=${DEADLINE}s"
        local step=${name%%-*}
        [[ " ${DEFERRED[*]} " == *" $step "* ]] || DEFERRED+=("$step")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    banner "$name (limit ${limit}s): $*"
    # SIGINT first: pytest then still prints the failures so far, a benchmark keeps its saved rows
    timeout -s INT --kill-after=10 "$limit" "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        note "$name" ok "$((SECONDS - t))" ""
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note "$name" TIMEOUT "$((SECONDS - t))" "stopped after ${limit}s"
    else
        note "$name" FAILED "$((SECONDS - t))" "exit code $rc (see the log)"
    fi
    return "$rc"
}

print_summary() {
    banner "summary"
    "$PYTHON" - "$OUT" <<'PY' || echo "(no results summary: the Python step above failed)"
import glob, json, sys
out = sys.argv[1]
for path in sorted(glob.glob(f"{out}/*_e2e.json")):
    doc = json.load(open(path))
    env = doc["env"]
    print(f"e2e {env['device']} torch {env['torch']} triton {env['triton']} ({path})")
    print(f"  {'model':<22} {'impl':<18} {'mode':<5} {'img/s':>9} {'ms':>8} {'vs ref':>7} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6}")
    for r in doc["rows"]:
        impl = r["impl"] + ("+compile" if r.get("compiled") else "")
        if r["status"] != "ok":
            print(f"  {r['model']:<22} {impl:<18} {r['mode']:<5} {r['status'][:60]}")
            continue
        sp = f"{r['speedup_vs_reference']:.2f}x" if r.get("speedup_vs_reference") else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        print(f"  {r['model']:<22} {impl:<18} {r['mode']:<5} {r['img_per_s']:9.0f} {r['ms_median']:8.2f} {sp:>7} "
              f"{r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {mem:>6}")
for path in sorted(glob.glob(f"{out}/*_attention_candidates.json")):
    doc = json.load(open(path))
    print(f"attention candidates ({path}): {doc.get('precompile', '')}")
    groups = {}
    for r in doc["rows"]:
        key = (r["B"], r["H"], r["N"], r["D"], r["dtype"])
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        parts = []
        for kind in ("fwd", "fwd_tma", "fwd_tma_persistent", "dkdv", "dq", "fused", "atomic"):
            ok = [r for r in rs if r["op"] == "attention_candidate" and r["kernel"] == kind and r["status"] == "ok"]
            if ok:
                best = min(ok, key=lambda r: r["ms"])
                worst = max(ok, key=lambda r: r["err"])
                parts.append(f"{kind} best {best['ms']:.3f} ms ({best['config']}) of {len(ok)}, "
                             f"worst err {worst['err']:.1e} (sdpa {worst['sdpa_err']:.1e})")
        tuned = [f"{r['mode']} {r['vs_best_sdpa']:.2f}x {r['best_sdpa']}" for r in rs
                 if r["op"] == "attention" and r["backend"] == "vitfast" and r.get("vs_best_sdpa")]
        print("  " + " ".join(map(str, key)) + ": " + "; ".join(parts) + (" | autotuned vs best SDPA: " + ", ".join(tuned) if tuned else ""))
        variants = [f"{r['bwd']}{' (auto)' if r['auto'] else ''} {r['ms']:.3f} ms x{r['x_best']}"
                    for r in rs if r["op"] == "attention_bwd_variant"]
        if variants:
            print("    backward variants (best candidates summed): " + ", ".join(variants))
        fwd = [f"{r['fwd']}{' (auto)' if r['auto'] else ''} {r['ms']:.3f} ms x{r['x_best']}"
               for r in rs if r["op"] == "attention_fwd_variant"]
        if fwd:
            print("    forward variants (best candidate each): " + ", ".join(fwd))
for path in sorted(glob.glob(f"{out}/*_kernels.json")):
    doc = json.load(open(path))
    print(f"kernels ({path}): {doc.get('benchmarks')}")
    for r in doc["rows"]:
        if r.get("backend", r.get("impl")) != "vitfast":
            continue
        keys = [k for k in ("benchmark", "B", "H", "N", "D", "model", "batch", "input", "dtype", "mode") if k in r]
        if r.get("status", "ok") != "ok":
            print("  " + " ".join(str(r[k]) for k in keys) + f"  {r['status'][:70]}")
            continue
        figs = [f"{k}={r[k]}" for k in ("ms", "tflops", "gbps", "vs_best_sdpa", "best_sdpa", "speedup_vs_eager",
                                         "speedup_vs_compile", "x_roofline_floor") if r.get(k) is not None]
        print("  " + " ".join(str(r[k]) for k in keys) + "  " + " ".join(figs))
PY
    printf '\n%-10s %-7s %5s  %s\n' step status time note
    printf '%s\n' "${SUMMARY[@]}"
    echo "results in $OUT (log: $LOG), total $((SECONDS - T0))s"
    if [ "${#DEFERRED[@]}" -gt 0 ]; then
        local rest step
        rest=build
        for step in "${DEFERRED[@]}"; do [ "$step" = build ] || rest+=",$step"; done
        echo "NOT RUN (deadline): ${DEFERRED[*]}. The rest, in a second call (the build is a no-op on a warm machine):"
        echo "  ONLY=$rest bash benchmarks/gpu_check.sh"
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
    if ! run_step build "${T_BUILD:-180}" "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
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
want info && { run_step info 60 "$PYTHON" -m vitfast.cli info || true; }

# ---- 2. the tests that need a GPU
# Autotuning off here (each attention kernel launches its first surviving config): the
# candidates step below checks every config's numerics, and tests then spend no minutes compiling.
if want tests; then
    run_step tests "${T_TESTS:-120}" env VITFAST_ATTENTION_AUTOTUNE=0 "$PYTHON" -m pytest -m cuda -q -rfE \
        --durations=10 -p no:cacheprovider tests || true
fi

# ---- 2b. every attention kernel candidate (each autotune survivor of the forward variants, pointer,
# TMA and persistent TMA, of dK/dV, dQ and the 5-matmul backward, deterministic "fused" and "atomic" and
# their TMA twins "tma" and "tma_atomic", timed
# alone and checked against float32), then the autotuned kernel beside SDPA's flash, efficient and
# cuDNN backends: the data the configs and variants are pruned by (issue: every GPU run a full
# experiment). The script stops starting shapes 15 s before its limit and saves after each shape.
if want candidates; then
    t_cand=${T_CANDIDATES:-150}
    left=$((DEADLINE - (SECONDS - T0)))
    [ "$t_cand" -gt "$left" ] && t_cand=$left
    # shellcheck disable=SC2086
    run_step candidates "$t_cand" "$PYTHON" -m vitfast.cli.kernels.attention_candidates --json "$OUT/" \
        --deadline "$((t_cand - 30))" ${CANDIDATE_ARGS:-} || true
fi

# ---- 2c. the measured dispatch: `vitfast tune` at ViT-B/16, batch 256, bf16, inference then training,
# into a cache the bench step below then runs with (its FastViT rows are "FastViT (table)" and
# record each op's path). VITFAST_GELU_EPILOGUE=1 here only, so that the inference tune also times
# cuBLASLt's tanh-GELU epilogue for fc1 (op linear_bias_gelu); the exact-GELU models of the bench
# never take it (it needs the same opt-in there). Each entry is printed with both timings.
TUNE_CACHE=${TUNE_CACHE:-.gpu_check/dispatch_tuned.json}
if want tune; then
    mkdir -p "$(dirname "$TUNE_CACHE")"
    rm -f "$TUNE_CACHE"
    run_step tune-inf "${T_TUNE:-40}" env VITFAST_DISPATCH_CACHE="$TUNE_CACHE" VITFAST_GELU_EPILOGUE=1 \
        "$PYTHON" -m vitfast.cli tune --model vit_base_patch16_224 --batch-size 256 --dtype bf16 --iters 20 || true
    run_step tune-trn "${T_TUNE:-40}" env VITFAST_DISPATCH_CACHE="$TUNE_CACHE" \
        "$PYTHON" -m vitfast.cli tune --model vit_base_patch16_224 --batch-size 256 --dtype bf16 --iters 20 --train || true
fi
# the bench runs with the tuned table, whether this call or an earlier one on this machine tuned
[ -f "$TUNE_CACHE" ] && export VITFAST_DISPATCH_CACHE="$TUNE_CACHE"

# ---- 3. end-to-end benchmark (GPU defaults: ViT-S/B/L at 224, bf16, batch 256, infer + train)
# BENCH_ARGS is split into words on purpose (extra options)
if want bench; then
    # shellcheck disable=SC2086
    run_step bench "${T_BENCH:-180}" "$PYTHON" -m vitfast.cli bench --no-progress \
        --json "$OUT/" --plot "$OUT/e2e_throughput.png" ${BENCH_ARGS:-} || true
fi

# ---- 4. kernel microbenchmarks
if want kernels; then
    # shellcheck disable=SC2086
    # each microbenchmark gets its own limit, and the rows are saved after each one
    run_step kernels "${T_KERNELS:-300}" "$PYTHON" -m vitfast.cli bench kernels --json "$OUT/" --timeout 150 \
        "--patch-embed-args=${PATCH_EMBED_ARGS---models vit_base_patch16_224}" ${KERNEL_ARGS---only patch_embed fused memory} || true
fi

# ---- 5. a short profile: the CUDA profiler path, a trace, the ncu command line
if want profile; then
    run_step profile "${T_PROFILE:-45}" "$PYTHON" -m vitfast.cli profile --model vit_base_patch16_224 --batch-size 64 \
        --steps 2 --top 10 --trace "$OUT/trace_vit_base_patch16_224.json.gz" --json "$OUT/" --ncu || true
fi

# ---- 6. the CUDA patch embedding under ncu: shared-memory bank conflicts, DRAM bytes and time of
# each patchify/unpatchify/prefill kernel of the C++ path (uint8 and bf16, NCHW and channels_last,
# forward + backward)
if want ncu && command -v ncu >/dev/null; then
    run_step ncu "${T_NCU:-60}" ncu --clock-control none -k "regex:patchify|prefill" --metrics \
        l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        "$PYTHON" benchmarks/patch_embed_ncu.py || true
fi

print_summary
