"""`tp-numa generate` under mpirun: the continuation appears once (rank 0), equal to the
world-size-1 / llama.cpp greedy text; an error is printed once and every rank exits."""
from __future__ import annotations

import subprocess
import sys

import pytest

from golden import load_golden
from mpi_util import mpirun_or_skip
from tp_numa.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.mpi]
N = 16


def run_mpi(cli_env, np_, *args, timeout=900):
    env = dict(cli_env, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [mpirun_or_skip(), "--oversubscribe", "-np", str(np_), "-x", "PYTHONPATH",
           sys.executable, "-m", "tp_numa.cli", "generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("np_", [2, 3])
def test_greedy_continuation_printed_once(cli_env, gemma_path, np_):
    g = load_golden("gemma3-270m")
    case = max(g["greedy"], key=lambda c: min(c["top2_margin"][:N]))
    ids = []
    for t in case["ids"][:N]:
        if t in g["eog_ids"]:
            break
        ids.append(t)
    expect = Tokenizer.from_gguf(gemma_path).decode(ids)
    proc = run_mpi(cli_env, np_, "-m", str(gemma_path), "-p", case["prompt"], "-n", str(N),
                   "--temperature", "0", "-c", "256")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expect
    assert proc.stderr.count("tp-numa: prompt ") == 1  # the timing line once, from rank 0


def test_error_is_printed_once(cli_env, tmp_path):
    missing = tmp_path / "absent.gguf"
    proc = run_mpi(cli_env, 2, "-m", str(missing), "-p", "hi", timeout=120)
    assert proc.returncode != 0
    assert proc.stdout == ""
    errors = [l for l in proc.stderr.splitlines() if l.startswith("tp-numa: error:")]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
