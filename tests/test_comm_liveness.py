"""Liveness of the shm collectives without MPI: two plain processes join one group
through the registered ops, then the peer exits or stops. The waiting rank must raise a
CommError naming the peer instead of spinning: early when the peer has exited (its pid is
gone and its heartbeat is 0.5 s old), after TP_NUMA_COMM_TIMEOUT when it is alive but
silent (SIGSTOP)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mpi_util import ROOT
from tp_numa.distributed import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="tp_numa._C without the shm ops")

_PEER = r"""
import os, sys, time, signal, torch
from tp_numa.distributed import shm
shm.load_extension()
prefix, mode = sys.argv[1], sys.argv[2]
h = torch.ops.tp_numa.shm_create(prefix, 1, [0, 1], 1 << 16, 1.0)
while not os.path.exists("/dev/shm" + prefix + ".0"):
    time.sleep(0.01)
torch.ops.tp_numa.shm_attach(h)
print("ATTACHED", flush=True)
sys.stdin.readline()
torch.ops.tp_numa.shm_unlink(h)
if mode == "exit":
    os._exit(0)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def _group_with_peer(mode, timeout_s):
    shm.load_extension()
    prefix = f"/tp_numa-test-live-{os.getpid()}-{mode}"
    h = torch.ops.tp_numa.shm_create(prefix, 0, [0, 1], 1 << 16, timeout_s)
    peer = subprocess.Popen([sys.executable, "-c", _PEER, prefix, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists("/dev/shm" + prefix + ".1"):
            assert time.monotonic() < deadline and peer.poll() is None, "peer did not start"
            time.sleep(0.01)
        torch.ops.tp_numa.shm_attach(h)
        assert peer.stdout.readline().strip() == "ATTACHED"
        torch.ops.tp_numa.shm_unlink(h)
        peer.stdin.write("go\n")
        peer.stdin.flush()
    except BaseException:
        peer.kill()
        torch.ops.tp_numa.shm_destroy(h)
        raise
    group = shm.ShmGroup(h, 0, 2, prefix)
    return group, peer, prefix


def test_exited_peer_is_detected_at_once():
    group, peer, prefix = _group_with_peer("exit", 4.0)
    try:
        peer.wait(timeout=60)  # reaped: its pid no longer exists
        t0 = time.monotonic()
        with pytest.raises(shm.CommError, match=r"rank 1 \(pid \d+\) has exited while rank 0 waited in all_reduce"):
            group.all_reduce(torch.ones(1000))
        assert time.monotonic() - t0 < 2.0  # well before the 4 s timeout (stale after 0.5 s)
        with pytest.raises(shm.CommError, match="unusable after an earlier error"):
            group.all_reduce(torch.ones(10))
    finally:
        group.close()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(prefix[1:])]


def test_silent_peer_times_out():
    group, peer, prefix = _group_with_peer("stop", 1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(shm.CommError, match=r"rank 1 \(pid \d+\) has stopped responding.*TP_NUMA_COMM_TIMEOUT=1.0s"):
            group.broadcast(torch.ones(10), 1)
        took = time.monotonic() - t0
        assert 0.9 < took < 5, took
    finally:
        peer.send_signal(signal.SIGKILL)
        peer.wait(timeout=60)
        group.close()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(prefix[1:])]
