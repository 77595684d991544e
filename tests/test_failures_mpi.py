"""Failure behaviour under mpirun (tests/comm_scripts/fail_worker.py).

Every case: all ranks end within 10 s of the failure with a non-zero exit, the error is
printed once, and /dev/shm holds nothing of the job afterwards.
"""
import os
import re
import time

import pytest

from mpi_util import mpirun_path, run_mpi
from tp_numa.distributed import shm

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found"),
    pytest.mark.skipif(not shm.available(), reason="tp_numa._C without the shm ops"),
]

# start-up of 2-3 Python+torch+MPI processes on a loaded 2-core box (the 10 s bound is
# measured from the failure, see _shutdown_s)
START_S = 60


def _run(mode, np_=3, env=None):
    r = run_mpi(np_, "fail_worker.py", mode, "1", env=env, timeout=START_S + 30)
    return r, time.time()


def _shutdown_s(out: str, ended: float) -> float:
    """Seconds from the failure (FAIL_AT printed by the worker) to the end of mpirun."""
    m = re.search(r"FAIL_AT (\d+\.\d+)", out)
    assert m, out
    return ended - float(m.group(1))


def _no_leftovers(out: str) -> None:
    m = re.search(r"PREFIX (/\S+)", out)
    assert m, out
    name = m.group(1)[1:]
    left = [f for f in os.listdir("/dev/shm") if f.startswith(name)]
    assert not left, f"left in /dev/shm: {left}"


@pytest.mark.parametrize("mode,np_,env,expect", [
    ("one-error", 3, {}, "rank 1 failed on purpose"),
    ("all-error", 3, {}, "model file '/nonexistent/model.gguf' not found"),
    ("check-all", 3, {}, "cannot be split over tp=3 (rank 1)"),
    ("mpi-wait", 2, {"TP_NUMA_COMM": "mpi"}, "rank 1 failed on purpose"),
])
def test_error_on_ranks_ends_all_and_prints_once(mode, np_, env, expect):
    r, ended = _run(mode, np_, env)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert out.count(expect) == 1, out
    assert out.count("tp-numa: error:") == 1, out
    assert _shutdown_s(out, ended) < 10, out
    if mode != "mpi-wait":
        _no_leftovers(out)


def test_sigkill_of_one_rank_ends_the_others():
    r, ended = _run("kill", 3)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert _shutdown_s(out, ended) < 10, out
    _no_leftovers(out)


def test_stopped_rank_hits_the_liveness_timeout():
    # a peer that is alive but silent (SIGSTOP): the waiting ranks give up after
    # TP_NUMA_COMM_TIMEOUT and report which rank stopped responding, once
    r, ended = _run("hang", 3, {"TP_NUMA_COMM_TIMEOUT": "2"})
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert out.count("has stopped responding") == 1, out
    assert "rank 1 (pid" in out, out
    assert _shutdown_s(out, ended) < 10, out
    _no_leftovers(out)
