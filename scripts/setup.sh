#!/usr/bin/env bash
# Sets up dmax_ext from scratch on a fresh machine: a virtual environment in .venv, torch, the
# Python dependencies, and the native build (CPU kernels; the CUDA kernels too when nvcc and a CUDA
# build of torch are present; the test-only emulated-CUDA libraries, plain and sanitized).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
pip install -q "$TORCH_SPEC"
pip install -q -r requirements.txt
export DMAX_BUILD_SIMT=${DMAX_BUILD_SIMT:-1}
export DMAX_BUILD_SIMT_ASAN=${DMAX_BUILD_SIMT_ASAN:-1}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
pip install -q --no-build-isolation -e .
python -c "import dmax_ext; print(dmax_ext.build_summary())"
