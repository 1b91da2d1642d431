#!/usr/bin/env bash
# DALI for a GPU machine that cannot download anything: fetch nvidia-dali-cuda130 and the packages it
# needs beyond a stock CUDA-13 PyTorch image, as Python 3.12 wheels, pack them into one tar and split
# it into pieces small enough to travel one per remote call (default 56 MiB; a call carries 64 MiB
# with the working tree). The pieces land in the git-ignored .gpu-wheels/pieces/.
#   bash scripts/gpu_wheels.sh            # here, where pip can download
#   bash scripts/gpu_install_wheels.sh keep      # there, in each call that carries a piece
#   bash scripts/gpu_install_wheels.sh install   # there, once every piece has arrived: installs into /tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.gpu-wheels
piece_mib=${PIECE_MIB:-56}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$dir/" "$exclude" 2>/dev/null || echo "/$dir/" >> "$exclude"
rm -rf "$dir" && mkdir -p "$dir/wheels" "$dir/pieces"
packages=(
    nvidia-dali-cuda130==2.4.0 "nvidia-nvimgcodec-cu13>=0.9.0,<0.10.0" nvidia-libnvcomp-cu13==5.3.0.16
    "nvidia-nvjpeg>=13,<14" nvidia-nvjpeg2k-cu13 "nvidia-nvtiff-cu13>=0.8.0"
    "astunparse>=1.6.0,<=1.6.3" "gast>=0.3.3,<=0.7.0" optree nvtx makefun "libcst~=1.8" "six>=1.16,<=1.17"
)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir/wheels" "${packages[@]}"
tar -C "$dir" -cf - wheels | split -b "${piece_mib}m" -d -a 2 - "$dir/pieces/part-"
rm -rf "$dir/wheels"
echo "carry one piece per call (each call's 'carry' names one file) and run 'scripts/gpu_install_wheels.sh keep' in it; then 'install':"
ls "$dir/pieces" | while read -r piece; do echo "$dir/pieces/$piece"; done
