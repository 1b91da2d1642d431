#!/usr/bin/env bash
# On the GPU machine. The repository there is replaced at every call and a carried piece does not
# outlive its call (seen on the H200, 2026-12-04), so each call that carries a piece keeps it outside
# the repository first:
#   bash scripts/gpu_install_wheels.sh keep       # in every call, carrying .gpu-wheels/pieces/part-NN
#   bash scripts/gpu_install_wheels.sh install    # once all have arrived (same warm machine)
# `install` joins the pieces kept in /tmp/gpu-wheel-pieces and installs the wheels into /tmp/site,
# leaving the image's own torch, triton and torchvision alone. Then: export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
cd "$(dirname "$0")/.."
kept=/tmp/gpu-wheel-pieces
case "${1:-}" in
    keep)
        mkdir -p "$kept"
        cp .gpu-wheels/pieces/part-* "$kept"/
        ls "$kept"
        ;;
    install)
        work=$(mktemp -d)
        cat "$kept"/part-* | tar -C "$work" -xf -
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$work"/wheels/*.whl
        rm -rf "$work"
        PYTHONPATH=/tmp/site python3 -c "import nvidia.dali as dali; print('DALI', dali.__version__)"
        ;;
    *)
        echo "usage: $0 keep|install" >&2
        exit 2
        ;;
esac
