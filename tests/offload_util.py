"""Shared by the offload tests (test_offload_model.py, test_offload_layers.py): all-F32
synthetic model types, a chunked forward, and the relative error they compare with."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from mpi_util import mpirun_or_skip

HERE = Path(__file__).resolve().parent

# every tensor F32: no activation quantization, so offloaded and CPU paths differ by
# float rounding only
F32 = dict(weight_type=QT.F32, embed_type=QT.F32, down_type=QT.F32, v_type=QT.F32)


def run(model, tokens, cache, chunks, ctx=64) -> torch.Tensor:
    """Feeds ``tokens`` in the given chunk sizes (prefill chunks, then 1-token decodes);
    returns the float32 logits of every position, [len(tokens), vocab]."""
    model.setup_cache(ctx, cache)
    ids, out, pos = torch.as_tensor(tokens), [], 0
    with torch.no_grad():
        for c in chunks:
            out.append(model(ids[pos:pos + c], pos).float())
            pos += c
    return torch.cat(out)


def offload_worker_logits(path, out, tokens, chunks, layers=(), np_: int = 2) -> np.ndarray:
    """Logits [len(tokens), vocab] of tests/offload_worker.py under ``mpirun -np np_``
    (one thread per rank): every rank offloads its attention cores to the "cpu" stand-in,
    and the decoder layers ``layers`` whole. Skips the calling test without mpirun."""
    mpirun = mpirun_or_skip()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(HERE.parent))
    cmd = [mpirun, "--oversubscribe", "-np", str(np_), sys.executable, str(HERE / "offload_worker.py"),
           str(path), str(out), "--tokens", ",".join(map(str, tokens)), "--chunks", ",".join(map(str, chunks))]
    if layers:
        cmd += ["--layers", ",".join(map(str, layers))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.load(out)


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref - mean(ref)|| per row, worst row."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    num = np.linalg.norm(ours - ref, axis=-1)
    den = np.linalg.norm(ref - ref.mean(-1, keepdims=True), axis=-1)
    return float((num / den).max())
