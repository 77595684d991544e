"""Run under mpirun by tests/test_failures_mpi.py: one or all ranks fail in a chosen way.

    fail_worker.py MODE [RANK]

Modes (RANK = the rank that misbehaves, default 1):
  one-error    RANK raises TpNumaError while the others sit in shm all-reduces
  all-error    every rank raises the same TpNumaError at the same point (a bad path)
  check-all    RANK's check fails inside parallel_state.check_all (the load agreement)
  mpi-wait     RANK raises while the others wait in an MPI collective (TP_NUMA_COMM=mpi)
  kill         RANK kills itself with SIGKILL in the middle of a stream of all-reduces
  hang         RANK stops itself (SIGSTOP): alive but silent; the others must give up

Errors go through the same path as the CLI: TpNumaError -> parallel_state.fail(str(e)).
Prints "PREFIX <shm prefix>" (rank 0) so the test can look for leftovers in /dev/shm, and
"FAIL_AT <unix time>" just before the failure so the test can time the shutdown.
"""
import os
import signal
import sys
import time

import torch

from tp_numa.distributed import communicator as C
from tp_numa.distributed import parallel_state
from tp_numa.errors import TpNumaError


def body(mode: str, bad: int) -> None:
    st = parallel_state.init()
    x = torch.ones(4096)
    C.all_reduce(x)  # sets up the shm group
    impl = C._get()
    if st.rank == 0 and getattr(impl, "shm", None) is not None:
        print("PREFIX", impl.shm.prefix, flush=True)
    C.barrier()
    if mode in ("all-error", "check-all") and st.rank == 0:
        print(f"FAIL_AT {time.time():.3f}", flush=True)
    if mode == "all-error":
        raise TpNumaError("model file '/nonexistent/model.gguf' not found")
    if mode == "check-all":
        ok = st.rank != bad
        parallel_state.check_all(ok, f"tensor 'blk.0.ffn_down.weight' cannot be split over tp={st.world_size} (rank {st.rank})")
        raise SystemExit("check_all let a failure through")
    for i in range(10**9):
        if st.rank == bad and i == 200:
            print(f"FAIL_AT {time.time():.3f}", flush=True)
            if mode in ("one-error", "mpi-wait"):
                raise TpNumaError(f"rank {bad} failed on purpose: cannot read tensor 'output.weight'")
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "hang":
                os.kill(os.getpid(), signal.SIGSTOP)
        C.all_reduce(x)
        x.fill_(1.0)


def main() -> int:
    mode = sys.argv[1]
    bad = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    try:
        body(mode, bad)
    except TpNumaError as e:
        parallel_state.fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
