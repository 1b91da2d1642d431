#!/usr/bin/env bash
# One script for a GPU machine: the GPU tests, then every benchmark, each writing its JSON.
# Runs on the torch/triton/torchvision already installed there (no reinstall):
#   FASTDENSE_BENCH_OUT=benchmarks/results bash benchmarks/run_gpu.sh [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${FASTDENSE_BENCH_OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "warning: C++ extension did not build; C++ paths fall back to the reference"

status=0
python3 -m pytest -q -x --timeout 900 -p no:cacheprovider ${1:+-k "$1"} \
    tests/test_nearest_neighbor.py tests/test_vicreg.py tests/test_roi_align.py 2>&1 | tee "$out/gpu_tests.log" || status=1
for bench in nearest_neighbor vicreg roi_align; do
    [ -f "benchmarks/bench_$bench.py" ] || continue
    echo "== bench_$bench"
    timeout 240 python3 "benchmarks/bench_$bench.py" || status=1
done
exit $status
