#!/usr/bin/env bash
# One script for a GPU machine: the GPU tests, then every GPU benchmark, each writing its JSON and log
# (and one log, gpu_run.log) to $FASTDENSE_BENCH_OUT (default benchmarks/results). Runs on the torch/triton/torchvision already
# installed there (no reinstall). Each step has its own time limit so one slow step cannot starve the rest.
#   FASTDENSE_BENCH_OUT=benchmarks/results bash benchmarks/run_gpu.sh                    # every step
#   FASTDENSE_BENCH_OUT=$OUT bash benchmarks/run_gpu.sh tests_nn bench_nearest_neighbor   # some steps
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Steps by name; `bash benchmarks/run_gpu.sh tests_nn bench_vicreg` runs just those (one device call
# has 10 minutes: the whole list takes about 17, so split it over two or three calls).
declare -A STEPS=(
    [tests_nn]="180 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_nearest_neighbor.py tests/test_methods.py::test_vicregl_step_matches_all_pairs_in_one_launch"
    [tests_vicreg]="120 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_vicreg.py tests/test_vicreg_distributed.py"
    [tests_roi]="150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_roi_align.py"
    [tests_training_gpu]="90 python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/test_resume.py"
    [bench_nearest_neighbor]="240 python3 benchmarks/bench_nearest_neighbor.py"
    [bench_vicreg]="90 python3 benchmarks/bench_vicreg.py"
    [bench_roi_align]="160 python3 benchmarks/bench_roi_align.py"
    [bench_roi_align_host]="90 python3 benchmarks/bench_roi_align.py --host"
    [tune_roi_align]="360 python3 benchmarks/tune_roi_align.py --budget-s 300"
    # bench_roi_align with tune_roi_align's settings (from $out) applied and recorded in its JSON
    [bench_roi_align_tuned]="160 python3 benchmarks/bench_roi_align.py --tuned"
    [bench_vicreg_host]="60 python3 benchmarks/bench_vicreg.py --host"
    [bench_nearest_neighbor_host]="60 python3 benchmarks/bench_nearest_neighbor.py --host"
    [bench_train_step]="120 python3 benchmarks/bench_train_step.py"
    # Needs DALI, which the GPU image lacks: scripts/gpu_wheels.sh here; there, one call per piece
    # (carrying it) runs `scripts/gpu_install_wheels.sh keep`, then `... install` (into /tmp/site).
    # Not in the default list; nor tests_pipelines_gpu, whose DALI case needs the same.
    [bench_pipelines]="420 env PYTHONPATH=/tmp/site:$PYTHONPATH python3 benchmarks/bench_pipelines.py --backends torch,dali"
    [tests_pipelines_gpu]="180 env PYTHONPATH=/tmp/site:$PYTHONPATH python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/test_pipelines.py"
)
ORDER=(tests_nn tests_vicreg tests_roi tests_training_gpu bench_nearest_neighbor bench_nearest_neighbor_host bench_vicreg bench_vicreg_host bench_roi_align bench_roi_align_host tune_roi_align bench_roi_align_tuned bench_train_step)
# Named steps are checked before anything runs; every step needs a GPU (without one the benchmarks
# would time CPU fallbacks, under their GPU time limits, into $out).
named_only=$(for name in "${!STEPS[@]}"; do [[ " ${ORDER[*]} " == *" $name "* ]] || echo "$name"; done | sort | tr '\n' ' ')
for name in "$@"; do
    [[ -n "${STEPS[$name]:-}" ]] || { echo "run_gpu.sh: unknown step $name (default steps: ${ORDER[*]}; when named: ${named_only% })" >&2; exit 2; }
done
python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || {
    echo "run_gpu.sh: torch sees no CUDA device here; run it on a GPU machine (a CPU has each benchmark's --quick and the tests: python3 -m pytest)" >&2; exit 2; }
out="${FASTDENSE_BENCH_OUT:-benchmarks/results}"
export FASTDENSE_BENCH_OUT="$out"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "warning: the C++ extension did not build"

status=0
log="$out/gpu_run.log"
[[ -f "$log" ]] || : > "$log"  # appended to, so that several calls build one log
step() {  # step NAME SECONDS COMMAND...: run with a limit, append to $out/gpu_run.log, show the tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" > "$out/.step.log" 2>&1 || { echo "   exit $?" | tee -a "$log"; status=1; }
    cat "$out/.step.log" >> "$log"
    tail -n 4 "$out/.step.log"
    rm -f "$out/.step.log"
}
for name in "${@:-${ORDER[@]}}"; do
    # shellcheck disable=SC2086
    step "$name" ${STEPS[$name]}
done
exit $status
