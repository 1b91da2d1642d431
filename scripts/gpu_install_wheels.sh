#!/usr/bin/env bash
# On the GPU machine: join the pieces scripts/gpu_wheels.sh made (carried over one call at a time
# into .gpu-wheels/pieces/) and install the wheels into /tmp/site, leaving the image's own torch,
# triton and torchvision alone. Then: export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
cat .gpu-wheels/pieces/part-* | tar -C "$work" -xf -
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$work"/wheels/*.whl
rm -rf "$work"
PYTHONPATH=/tmp/site python3 -c "import nvidia.dali as dali; print('DALI', dali.__version__)"
