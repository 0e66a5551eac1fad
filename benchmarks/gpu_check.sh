#!/usr/bin/env bash
# GPU check in one command: on a CUDA host, in under 8 minutes,
#   1. prints the card (nvidia-smi) and the torch / triton / flash-attn versions;
#   2. runs the gpu-marked tests (`pytest -m gpu`) with TRITON_INTERPRET unset, so the Triton
#      kernels are compiled, and HYBRIDLAB_KERNELS / HYBRIDLAB_ATTENTION unset, so the tests see
#      the default dispatch;
#   3. runs `benchmarks/bench_scan.py --device cuda` (full sizes, L up to 4096, 3 timed calls);
#   4. prints one summary: each step's status and seconds, and the benchmark's ratio lines.
#
#   bash benchmarks/gpu_check.sh                     # Python from .venv, else python3
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Exit status: 0 when every step passed, 1 when one failed or ran out of time, 2 when this host
# cannot run the check (no CUDA device, or Python lacks torch or the packages), with nothing run.
# GPU_CHECK_PYTEST_S and GPU_CHECK_BENCH_S override the steps' time limits (280 s and 160 s: with
# the kill grace and the version step, the whole run stays under 8 minutes).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
pytest_limit_s=${GPU_CHECK_PYTEST_S:-280}
bench_limit_s=${GPU_CHECK_BENCH_S:-160}
kill_grace_s=10

refuse() {
    echo "gpu_check: $1" >&2
    echo "gpu_check: nothing was run (exit 2)" >&2
    exit 2
}

if ! cuda=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()), torch.__version__)' \
    2>/dev/null); then
    refuse "'$PYTHON' cannot import torch; set PYTHON to the interpreter of hybridlab's environment"
fi
if [[ ${cuda%% *} != 1 ]]; then
    smi="nvidia-smi not found"
    command -v nvidia-smi >/dev/null && smi="nvidia-smi is present"
    refuse "no CUDA device: torch ${cuda#* } in '$PYTHON' reports torch.cuda.is_available() False \
($smi). Run this on a CUDA host."
fi
# The checkout's own packages first, so an un-installed checkout runs too and an installed copy
# elsewhere does not shadow the code under test.
export PYTHONPATH="$repo:$repo/kernels${PYTHONPATH:+:$PYTHONPATH}"
if ! missing=$("$PYTHON" -c '
import importlib.util
need = ("pytest", "triton", "hybridlab", "hybridlab_kernels")
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))'); then
    refuse "'$PYTHON' failed to look up its packages"
fi
if [[ -n $missing ]]; then
    refuse "'$PYTHON' lacks: $missing (install with: pip install -e '.[dev,gpu]')"
fi

unset TRITON_INTERPRET HYBRIDLAB_KERNELS HYBRIDLAB_ATTENTION
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
logs=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
start_all=$SECONDS
declare -a names statuses seconds

# run_step NAME LIMIT_S COMMAND...: runs it with output shown and kept in $logs/NAME.log.
run_step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo
    echo "==== gpu_check: $name: $* ===="
    if [[ $limit -gt 0 ]]; then
        timeout --kill-after="$kill_grace_s" "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    else
        "$@" 2>&1 | tee "$logs/$name.log"
    fi
    rc=${PIPESTATUS[0]}
    names+=("$name")
    seconds+=($((SECONDS - start)))
    if [[ $rc -eq 0 ]]; then
        statuses+=("ok")
    elif [[ $limit -gt 0 && ($rc -eq 124 || $rc -eq 137) ]]; then
        statuses+=("TIMEOUT after ${limit} s")
    else
        statuses+=("FAILED (exit $rc)")
    fi
}

versions() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    else
        echo "nvidia-smi not found"
    fi
    "$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import torch

def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"

major, minor = torch.cuda.get_device_capability()
print(f"device: {torch.cuda.get_device_name()} (compute capability {major}.{minor}), "
      f"{torch.cuda.device_count()} visible")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {version('triton')}, "
      f"flash-attn {version('flash-attn')}")
EOF
}

run_step versions 0 versions
run_step pytest "$pytest_limit_s" "$PYTHON" -m pytest -m gpu -q tests
run_step bench "$bench_limit_s" "$PYTHON" benchmarks/bench_scan.py --device cuda --repeats 3

failed=0
echo
echo "==== gpu_check summary ===="
cat "$logs/versions.log"
printf '%-9s %-22s %8s\n' step status seconds
for i in "${!names[@]}"; do
    printf '%-9s %-22s %8s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}"
    [[ ${statuses[$i]} == ok ]] || failed=1
done
# pytest's closing line, e.g. "31 passed, 2 skipped, 700 deselected in 150.2s"
counts=$(grep -E '^=* ?([0-9]+ [a-z]+,? )+in [0-9.]+s|no tests ran' "$logs/pytest.log" | tail -n 1)
echo "pytest: ${counts:-no closing line (see the log)}"
echo "bench_scan ratios (speedup: that row's time / ours, the torch path):"
grep -E '[0-9.]+x / [0-9.]+x' "$logs/bench.log" | sed 's/^/  /'
sed -n '/^Acceptance/,$p' "$logs/bench.log"
echo "total $((SECONDS - start_all)) s; full logs in $logs"
if [[ $failed -ne 0 ]]; then
    echo "gpu_check: FAILED"
    exit 1
fi
echo "gpu_check: all steps passed"
