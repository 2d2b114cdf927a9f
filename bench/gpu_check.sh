#!/usr/bin/env bash
# GPU check of selfheal_ext: records the machine, builds the extension with CUDA
# in place, runs the tests and the op benchmark, and leaves every log and result
# in OUTDIR.
#
#   bench/gpu_check.sh OUTDIR
#
# For a machine with one GPU and no network, where `python` on PATH has a CUDA
# torch (and pytest for the tests). Every step runs under a time limit so the
# whole check ends within about 7 minutes on an H200 (GPU_CHECK_DEADLINE_S
# changes the 420 s deadline). The whole test suite runs last, in whatever time
# is left: the CUDA tests and the GPU numbers come first. A failed step is recorded in OUTDIR/steps.tsv and
# later steps still run where they make sense, so one failing test does not lose
# the benchmark numbers. Exit status: 0 only if every step passed.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

DEADLINE_S=${GPU_CHECK_DEADLINE_S:-420}
MIN_STEP_S=20
# Output reaches the logs even when a step is killed at its limit.
export PYTHONUNBUFFERED=1
# No network here: pip must never sit waiting on an index.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Some images name their interpreter python3 only.
if ! command -v python >/dev/null && command -v python3 >/dev/null; then
  PY_SHIM=$(mktemp -d)
  # A wrapper, not a symlink: a symlinked venv python would not find its venv.
  printf '#!/bin/sh\nexec %q "$@"\n' "$(command -v python3)" > "$PY_SHIM/python"
  chmod +x "$PY_SHIM/python"
  export PATH="$PY_SHIM:$PATH"
fi

STEPS_FILE=$OUTDIR/steps.tsv
printf 'step\tstatus\texit\tseconds\n' > "$STEPS_FILE"
FAILURES=0

# Seconds a step may run: its cap, or less so that `reserve` seconds remain
# before the deadline for the steps after it.
step_limit() {
  local cap=$1 reserve=$2
  local left=$((DEADLINE_S - SECONDS - reserve))
  if ((left < MIN_STEP_S)); then left=$MIN_STEP_S; fi
  if ((left < cap)); then echo "$left"; else echo "$cap"; fi
}

record() {
  local name=$1 status=$2 rc=$3 seconds=$4
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" >> "$STEPS_FILE"
  if [[ $status != ok && $status != skipped ]]; then FAILURES=$((FAILURES + 1)); fi
  echo "=== $name: $status (exit $rc, ${seconds}s)"
}

# run_step NAME LOG LIMIT_S OK_CODES CMD...
# Runs CMD under a time limit, its output to the terminal and appended to
# OUTDIR/LOG. OK_CODES lists the exit codes that count as success. Returns
# non-zero on failure; the failure is recorded, never fatal to the script.
run_step() {
  local name=$1 log=$2 limit_s=$3 ok_codes=$4
  shift 4
  local start=$SECONDS rc=0 status=ok
  # Inline scripts are long: the header shows the command's start on one line.
  local shown=${*//$'\n'/ }
  echo "=== $name (limit ${limit_s}s): ${shown:0:120}" | tee -a "$OUTDIR/$log"
  timeout -k 10 "$limit_s" "$@" 2>&1 | tee -a "$OUTDIR/$log" || rc=$?
  if [[ " $ok_codes " != *" $rc "* ]]; then
    status=failed
    if ((rc == 124 || rc == 137)); then status=timed_out; fi
  fi
  record "$name" "$status" "$rc" "$((SECONDS - start))"
  [[ $status == ok ]]
}

skip_step() {
  record "$1" skipped 0 0
  echo "    ($2)"
}

# pip's editable install is the normal path. When pip itself cannot work offline
# (the compilers never ran), setup.py builds the same extension in place. A
# compiler failure is not retried: it would fail the same way at twice the cost.
build_extension() {
  local pip_log rc
  pip_log=$(mktemp)
  python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$pip_log"
  rc=${PIPESTATUS[0]}
  if ((rc == 0)); then rm -f "$pip_log"; return 0; fi
  if grep -qE 'FAILED: |Error compiling objects|error: command .* failed with exit code|static libstdc\+\+' "$pip_log"; then
    rm -f "$pip_log"
    return "$rc"
  fi
  rm -f "$pip_log"
  echo "--- pip could not run the build (exit $rc); falling back to setup.py build_ext --inplace"
  python setup.py build_ext --inplace
}
export -f build_extension

TORCH_INFO='
import os, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
for index in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(index)
    print(f"device {index}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
print("torch arch list:", torch.cuda.get_arch_list())
print("CPUs:", os.cpu_count(), "| torch threads:", torch.get_num_threads())
sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")
'

TOOLCHAIN_INFO='
for tool in "nvcc --version" "gcc --version" "ninja --version" "python -m pip --version" \
            "python -m pytest --version" "python -m pip list"; do
  echo "\$ $tool"
  $tool 2>&1 || echo "(not available)"
done
echo "CUDA_HOME=${CUDA_HOME:-} nvcc=$(command -v nvcc || true)"
free -g
df -h .
'

BUILD_INFO='
import sys, selfheal_ext
info = selfheal_ext.build_info()
print(info)
sys.exit(0 if info["cuda_compiled"] else "selfheal_ext was built without its CUDA kernels")
'

echo "gpu_check: repo $REPO, results in $OUTDIR, deadline ${DEADLINE_S}s"
run_step nvidia-smi nvidia-smi.txt 60 0 nvidia-smi || true
run_step torch-info torch_info.txt 90 0 python -c "$TORCH_INFO" || true
# Informational: a missing tool shows up in the log, and in the build if it matters.
run_step toolchain toolchain.txt 60 0 bash -c "$TOOLCHAIN_INFO" || true

# The system compiler pair, when there is one: an image may point CXX at a
# compiler that links libstdc++ statically, and such an extension crashes beside
# torch's shared libstdc++ (setup.py refuses it). GPU_CHECK_CC/CXX override.
# (chosen as a pair: never /usr/bin/gcc with another g++)
if [[ -x /usr/bin/gcc && -x /usr/bin/g++ ]]; then
  default_cc=/usr/bin/gcc default_cxx=/usr/bin/g++
else
  default_cc=$(command -v gcc || true) default_cxx=$(command -v g++ || true)
fi
BUILD_CC=${GPU_CHECK_CC:-$default_cc}
BUILD_CXX=${GPU_CHECK_CXX:-$default_cxx}
compilers=()
if [[ -n $BUILD_CC && -n $BUILD_CXX ]]; then compilers=(CC="$BUILD_CC" CXX="$BUILD_CXX"); fi
echo "build compilers: ${compilers[*]:-as the environment has them (CC=${CC:-} CXX=${CXX:-})}"
# pytest-xdist, when present, spreads the CUDA tests over several processes.
XDIST=()
if python -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi

built=false
if run_step build build.log "$(step_limit 360 180)" 0 \
    env "${compilers[@]}" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 bash -c build_extension; then
  built=true
fi

if $built; then
  run_step build-info build_info.txt 60 0 python -c "$BUILD_INFO" || true
  # Exit code 5 is pytest's "no tests collected": no CUDA tests yet is not a failure.
  run_step tests-cuda tests_cuda.log "$(step_limit 120 200)" "0 5" \
    python -m pytest tests -q -k cuda "${XDIST[@]}" --maxfail=30 -p no:cacheprovider || true
  run_step bench bench_cuda.txt "$(step_limit 600 80)" 0 \
    python bench/bench_ops.py --device cuda --out "$OUTDIR/ops_cuda.json" || true
  run_step overhead overhead_cuda.txt "$(step_limit 120 30)" 0 \
    python bench/overhead.py --device cuda --quick --out "$OUTDIR/overhead_cuda.json" || true
  run_step demo demo_cuda.txt "$(step_limit 90 5)" 0 \
    python -m selfheal_ext demo --quick --device cuda --no-progress --out "$OUTDIR/demo" || true
  if ((DEADLINE_S - SECONDS >= MIN_STEP_S)); then
    run_step tests-all tests_all.log "$((DEADLINE_S - SECONDS))" 0 python -m pytest tests -q --maxfail=30 -p no:cacheprovider || true
  else
    skip_step tests-all "no time left before the deadline"
  fi
else
  # Without a fresh build the tests and benchmark would only measure the
  # pure-PyTorch fallback (or fail to import): build.log holds the answer.
  for step in build-info tests-cuda bench overhead demo tests-all; do skip_step "$step" "build failed"; done
fi

echo
echo "=== steps (${SECONDS}s in all):"
column -t -s $'\t' "$STEPS_FILE" 2>/dev/null || cat "$STEPS_FILE"
echo
ls -la "$OUTDIR"
if ((FAILURES > 0)); then
  echo "gpu_check: $FAILURES step(s) failed" >&2
  exit 1
fi
echo "gpu_check: all steps passed"
