#!/usr/bin/env bash
# Set up .venv with torch (CPU build), fedvb and its dev extra. Safe to run again.
#
# torch goes in first: on these machines `torch==2.13.0` is a CPU build on local
# disk, while an open `torch` requirement would pull a multi-GB CUDA build.
# Elsewhere, set FEDVB_TORCH to the torch requirement you want (or install
# torch into .venv yourself first).
set -euo pipefail
cd "$(dirname "$0")/.."
# Fashion-MNIST comes from a Debian package, and IVON's native CPU kernels need a C
# compiler (fedvb.core.ivon_native); install what is missing when we can (root with apt).
packages=()
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
command -v cc >/dev/null || command -v gcc >/dev/null || packages+=(gcc)
if [ ${#packages[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && apt-get install -y -qq "${packages[@]}"; } >/dev/null 2>&1 \
    || echo "setup: could not install ${packages[*]} (Fashion-MNIST tests, native IVON kernels)" >&2
fi
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${FEDVB_TORCH:-torch==2.13.0}"
fi
# dev: the test tools; tensorboard: --log tensorboard; ray-jobs: Ray's dashboard and job submission
.venv/bin/python -m pip install -q -e '.[dev,tensorboard,ray-jobs]'
