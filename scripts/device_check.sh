#!/usr/bin/env bash
# The one command run on a lent GPU machine (an H200 with no network): builds
# gqa_ext with its CUDA kernels, dumps register use and SASS instruction
# counts, runs the CUDA tests, the rest of the tests, then the GPU benchmark
# (python -m gqa_ext bench --device cuda), in at most 8 minutes. Through the
# device tool, from the repo root:
#
#   run  command: bash scripts/device_check.sh   carry: [".whl"]   timeout_s: 600
#
# .whl/ holds the nvidia-cutlass wheel (its CuTe headers; the machine lacks the
# package). Prepare it once, here, in the repo root:
#   grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl nvidia-cutlass==4.2.0.0
# (the wheel is pure Python, py3-none-any, 6.4 MB).
#
# Output goes to $OUT (default ./device_out). Only 8 files come back from the
# machine, so it writes exactly these: build.log, res_usage.txt,
# sass_summary.txt, tests.xml (CUDA tests), tests_rest.xml, tests.log,
# bench.json, bench.log. Only the last 12,000 characters of output come back,
# so a summary of the steps and the benchmark's table are printed last.
# Exit status: 0 if every step passed, else non-zero. A failed build ends the
# run; failed tests still let the benchmark run.
#
# Knobs (environment): DEVICE_CHECK_BUDGET_S (default 480), TORCH_CUDA_ARCH_LIST
# (default 9.0), MAX_JOBS (default: all cores), GQA_EXT_CUDA (default 1),
# DEVICE_CHECK_BENCH_ARGS (extra benchmark arguments, e.g. --quick, or
# "--mode backward,prefill,decode,train --case llama3-8b": later options win).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/device_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{build.log,res_usage.txt,sass_summary.txt,tests.xml,tests_rest.xml,tests.log,bench.json,bench.log}
START=$(date +%s)
DEADLINE=$((START + ${DEVICE_CHECK_BUDGET_S:-480}))
# Seconds kept for the benchmark when sizing the test steps' time limits.
BENCH_RESERVE=150
WORK=$(mktemp -d) # tests and benchmark run here: the source tree would shadow the installed package
TABLE=$WORK/bench_table.txt
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

STATUS=0
SUMMARY=()
left() { echo $((DEADLINE - $(date +%s))); }
# limit RESERVE: seconds left before the deadline less RESERVE, at least 30.
limit() {
    local s=$(($(left) - $1))
    echo $((s < 30 ? 30 : s))
}
# record STEP RESULT SECONDS [NOTE]: RESULT is ok, FAILED or skipped.
record() {
    SUMMARY+=("$(printf '%-16s %-7s %4s s  %s' "$1" "$2" "$3" "${4:-}")")
    if [[ $2 == FAILED ]]; then STATUS=1; fi
}
banner() { printf '\n==== %s (%d s in, %d s left)\n' "$1" $(($(date +%s) - START)) "$(left)"; }

finish() {
    local rc=$?
    trap - EXIT
    set +e
    if ((rc != 0 && STATUS == 0)); then STATUS=$rc; fi
    if ((rc != 0)) && [[ ${EXPECTED_EXIT:-} != 1 ]]; then
        record "script" FAILED 0 "stopped early with status $rc (see above)"
    fi
    printf '\n==== summary: %d s, exit %d, outputs in %s\n' $(($(date +%s) - START)) "$STATUS" "$OUT"
    printf '%s\n' "${SUMMARY[@]}"
    if [[ -s $TABLE ]]; then
        printf '\n'
        cat "$TABLE"
    fi
    rm -rf "$WORK"
    exit "$STATUS"
}
trap finish EXIT

# ---- carried wheels
banner "wheels"
t=$(date +%s)
if compgen -G ".whl/*.whl" >/dev/null; then
    ls -l .whl/
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        record wheels ok $(($(date +%s) - t)) "$(cd .whl && echo *.whl)"
    else
        record wheels FAILED $(($(date +%s) - t))
    fi
else
    echo "no .whl/ folder: nvidia-cutlass must be installed already"
    record wheels skipped 0 "no .whl/"
fi

# ---- machine
banner "machine"
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH=$PATH:/usr/local/cuda/bin
fi
nvidia-smi || echo "nvidia-smi failed"
GPU=$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader 2>/dev/null |
    head -1 || true)
nvcc --version | tail -n 2 || echo "no nvcc"
python3 - <<'EOF' || true
import sys

import torch

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch")
try:
    import cutlass_library

    print("nvidia-cutlass:", cutlass_library.__file__)
except ImportError:
    print("nvidia-cutlass: not importable (the CUDA build needs its headers)")
EOF
record machine ok 0 "${GPU:-nvidia-smi gave nothing}"

# ---- build
banner "build"
t=$(date +%s)
rc=0
# GQA_EXT_PTXAS_VERBOSE asks for ptxas -v (registers, spills) where the build reads it.
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} GQA_EXT_CUDA=${GQA_EXT_CUDA:-1} \
    GQA_EXT_PTXAS_VERBOSE=${GQA_EXT_PTXAS_VERBOSE:-1} \
    timeout -k 10 "$(limit 60)" \
    python3 -m pip install --no-build-isolation --no-deps --no-index -v . >"$OUT/build.log" 2>&1 || rc=$?
build_s=$(($(date +%s) - t))
echo "build: ${build_s} s, status $rc (log: build.log)"
grep -E "gqa_ext: CUDA|Successfully installed" "$OUT/build.log" || true
if ((rc != 0)); then
    if ((rc == 124 || rc == 137)); then echo "build ran out of time"; fi
    grep -nE "error|Error|FAILED" "$OUT/build.log" | head -n 40 || true
    echo "---- last lines of build.log"
    tail -n 30 "$OUT/build.log"
    record build FAILED "$build_s" "status $rc; the rest cannot run"
    EXPECTED_EXIT=1
    exit 1
fi
# ptxas -v lines, where the build asks for them: spills are worth seeing at once.
grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$OUT/build.log" | head -n 10 || true
info=$(cd "$WORK" && python3 -c "import gqa_ext, json; print(json.dumps(gqa_ext.build_info()))" 2>&1) || info="IMPORT FAILED: $info"
echo "build_info: $info"
if [[ $info == *'"cuda_kernels": true'* ]]; then
    record build ok "$build_s" "cuda_kernels true"
else
    record build FAILED "$build_s" "installed, but not importable or without CUDA kernels: ${info:0:120}"
fi

# ---- registers and SASS
banner "sass"
t=$(date +%s)
SO=$(cd "$WORK" && python3 -c "
import glob, importlib.util, os
spec = importlib.util.find_spec('gqa_ext')
print(next(iter(sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), '_C*.so')))), ''))" 2>/dev/null || true)
if [[ -z $SO ]]; then SO=$(find "$REPO/build" -name '_C*.so' 2>/dev/null | head -n 1 || true); fi
# The toolkit's cuobjdump matches the compiler that built the library; the
# helper falls back to triton's copy.
CUOBJDUMP=$(command -v cuobjdump || python3 scripts/sass_summary.py --which 2>/dev/null || true)
if [[ -z $SO ]]; then
    record sass FAILED 0 "no _C*.so found"
elif [[ -z $CUOBJDUMP ]]; then
    record sass FAILED 0 "no cuobjdump"
else
    echo "$SO"
    rc=0
    timeout 120 "$CUOBJDUMP" -res-usage "$SO" >"$OUT/res_usage.txt" 2>&1 || rc=$?
    timeout 240 python3 scripts/sass_summary.py --cuobjdump "$CUOBJDUMP" "$SO" >"$OUT/sass_summary.txt" 2>&1 || rc=$?
    awk '/^uses local memory/ { exit } { print }' "$OUT/sass_summary.txt" | head -n 40
    grep -A 12 "^uses local memory" "$OUT/sass_summary.txt" || true
    if ((rc == 0)); then
        record sass ok $(($(date +%s) - t)) "$(grep -cE '^sm_' "$OUT/sass_summary.txt" || true) kernel rows"
    else
        record sass FAILED $(($(date +%s) - t)) "status $rc"
    fi
fi

# ---- tests
# run_tests STEP JUNIT_NAME PYTEST_ARGS...: runs pytest from outside the repo under a time limit.
run_tests() {
    local step=$1 junit=$2
    shift 2
    local lim=$(($(left) - BENCH_RESERVE))
    if ((lim < 20)); then
        record "$step" skipped 0 "no time left before the benchmark"
        return
    fi
    banner "$step (limit ${lim} s)"
    local t rc=0 log="$WORK/$step.log"
    t=$(date +%s)
    (cd "$WORK" && timeout -k 10 "$lim" python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120 \
        --junitxml="$OUT/$junit" "$@") >"$log" 2>&1 || rc=$?
    {
        echo "==== $step: pytest $*"
        cat "$log"
    } >>"$OUT/tests.log"
    tail -n 25 "$log"
    local last
    # pytest's closing line: "3 failed, 120 passed in 41.20s"
    last=$(grep -E " in [0-9.]+s" "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//' || true)
    if ((rc == 124 || rc == 137)); then last="timed out after ${lim} s; $last"; fi
    if ((rc == 0)); then
        record "$step" ok $(($(date +%s) - t)) "$last"
    else
        record "$step" FAILED $(($(date +%s) - t)) "status $rc: $last"
    fi
}

CUDA_TESTS=("$REPO/tests/test_cuda_forward.py" "$REPO/tests/test_cuda_backward.py")
if [[ -f ${CUDA_TESTS[0]} && -f ${CUDA_TESTS[1]} ]]; then
    run_tests tests_cuda tests.xml "${CUDA_TESTS[@]}" --maxfail=25
else
    record tests_cuda FAILED 0 "tests/test_cuda_forward.py or tests/test_cuda_backward.py does not exist"
fi
# The rest is mostly CPU tests: with pytest-xdist and enough cores, 4 workers
# of a quarter of the cores each finish sooner than one.
XDIST=()
if (($(nproc) >= 8)) && python3 -c "import xdist" 2>/dev/null; then
    XDIST=(-n 4)
    export OMP_NUM_THREADS=$(($(nproc) / 4))
fi
run_tests tests_rest tests_rest.xml "$REPO/tests" --ignore="${CUDA_TESTS[0]}" --ignore="${CUDA_TESTS[1]}" "${XDIST[@]}"
unset OMP_NUM_THREADS

# ---- benchmark
lim=$(($(left) - 15))
banner "benchmark (limit ${lim} s)"
t=$(date +%s)
rc=0
if ((lim < 60)); then
    record bench skipped 0 "too little time left"
else
    # The installed package's benchmark: the backward alone (causal, and
    # backward-full without the mask) on llama3-8b, prefill and decode on every
    # model. The quick cases run first, model by model in --mode's order, then
    # the rest while the time budget lasts (what it leaves out is listed as
    # skipped): llama3-8b's S4096 B4 backward cases come first of all, before
    # FlexAttention's compiles take the time. Train (forward + backward) is left
    # out for time; add it with DEVICE_CHECK_BENCH_ARGS="--mode
    # backward,prefill,decode,train --case llama3-8b". No plots: only the
    # files named above come back.
    # shellcheck disable=SC2086  # DEVICE_CHECK_BENCH_ARGS is a list of words
    (cd "$WORK" && timeout -k 10 "$lim" python3 -m gqa_ext bench --device cuda --mode backward,prefill,decode \
        --case "llama3-8b backward,prefill,decode" \
        --out "$WORK/bench" --no-plots --json "$OUT/bench.json" --table "$TABLE" \
        --time-budget $((lim - 45)) ${DEVICE_CHECK_BENCH_ARGS:-}) 2>&1 |
        tee "$OUT/bench.log" |
        # One line per case here; the details are in bench.log, the table comes at the end.
        awk '/^total [0-9.]+ s$/ { stop = 1 } !stop && !/^    / { print; fflush() }' || rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        record bench FAILED $(($(date +%s) - t)) "timed out after ${lim} s (bench.json has the cases done)"
    elif ((rc != 0)); then
        record bench FAILED $(($(date +%s) - t)) "status $rc (1: our op raised or was wrong in a case)"
    else
        record bench ok $(($(date +%s) - t))
    fi
fi
