#!/usr/bin/env bash
# Installs everything fastdense needs on a fresh machine: system packages, torch, and fastdense
# itself (editable, with its optional backends and test tools). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
# g++ and the Python headers compile csrc/ into fastdense._C during the editable install below.
SYSTEM_PACKAGES="libturbojpeg0-dev libopencv-dev pkg-config g++"
if ! python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    SYSTEM_PACKAGES="$SYSTEM_PACKAGES python3-dev"
fi
if ! dpkg -s $SYSTEM_PACKAGES >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $SYSTEM_PACKAGES >/dev/null
fi

PIP="python3 -m pip install --disable-pip-version-check -q"
$PIP "torch==2.14.1" "torchvision==0.29.1"
# --no-build-isolation builds against the torch installed above, so the build requirements of
# pyproject.toml must be present too (setuptools >= 64 for editable installs of extensions).
$PIP "setuptools>=69" wheel
# FFCV 1.0.2 is an sdist whose setup.py declares opencv-python (GUI build) and benchmark-only
# packages; its runtime needs are numba and OpenCV (headless here), and it compiles against the
# system libturbojpeg/OpenCV above. Install those, then FFCV itself without its declared deps.
if ! python3 -c "import ffcv" >/dev/null 2>&1; then
    $PIP "numba>=0.61" "opencv-python-headless>=4.8"
    $PIP --no-deps --no-build-isolation "ffcv==1.0.2"
fi
$PIP --no-build-isolation -e ".[dev,timm,dali,train-logs]"
