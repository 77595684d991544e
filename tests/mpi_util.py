"""Launching small scripts under the venv's mpirun from tests (shared by the comm tests)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "comm_scripts"


def mpirun_path() -> str | None:
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


def mpirun_or_skip() -> str:
    """``mpirun_path()``, skipping the calling test where there is none."""
    found = mpirun_path()
    if found is None:
        pytest.skip("mpirun not installed")
    return found


def run_mpi(np_: int, script: str, *args: str, env: dict | None = None, timeout: float = 120,
            extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """``mpirun -np np_ python comm_scripts/script args`` with the repo on PYTHONPATH."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    full_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    full_env.update(env or {})
    cmd = [mpirun_path(), "--oversubscribe", "--bind-to", "none", "-np", str(np_)]
    for key in (env or {}):
        cmd += ["-x", key]
    cmd += list(extra or [])
    cmd += [sys.executable, str(SCRIPTS / script), *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def split_and_replicated_bytes(f, cfg, tp: int) -> tuple[int, int]:
    """(bytes of split tensors, bytes of replicated tensors) of a GGUF at tensor parallel
    ``tp``, by the sharding table (DESIGN.md): vectors (norms, biases) are replicated, so
    are the K/V projections once tp > n_kv_heads; every other matrix (q, o, ffn,
    embedding / LM head rows) is split. A rank should hold split / tp + replicated."""
    split = replicated = 0
    for name, info in f.tensors.items():
        kv = name.endswith(("attn_k.weight", "attn_v.weight"))
        if len(info.shape) == 1 or (kv and tp > cfg.n_kv_heads):
            replicated += info.n_bytes
        else:
            split += info.n_bytes
    return split, replicated
