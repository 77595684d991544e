"""Process group state: which rank this is, how many there are, where they live.

World size 1 (plain `tp-numa ...`) needs no MPI launcher and never imports mpi4py.
Under `mpirun`, MPI is initialised through mpi4py and every rank is one tensor-parallel
shard (tp = world size).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0      # rank among the ranks of this host
    local_size: int = 1      # ranks on this host
    host_index: int = 0      # which host (0..n_hosts-1)
    n_hosts: int = 1

    @property
    def tp_rank(self) -> int:
        return self.rank

    @property
    def tp_size(self) -> int:
        return self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_state: ParallelState | None = None


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def mpi_comm():
    """COMM_WORLD of mpi4py (only valid when world size > 1 or launched by mpirun)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def init(hosts_per_rank: bool = False) -> ParallelState:
    """Initialise once. ``hosts_per_rank`` makes every rank count as its own host (to test
    the cross-host path on one machine)."""
    global _state
    if _state is not None:
        return _state
    if not launched_by_mpi():
        _state = ParallelState()
        return _state
    comm = mpi_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    if hosts_per_rank:
        host_ids = list(range(size))
    else:
        from mpi4py import MPI

        names = comm.allgather(MPI.Get_processor_name())
        order = sorted(set(names), key=names.index)
        host_ids = [order.index(n) for n in names]
    mine = host_ids[rank]
    local = [r for r in range(size) if host_ids[r] == mine]
    _state = ParallelState(
        rank=rank,
        world_size=size,
        local_rank=local.index(rank),
        local_size=len(local),
        host_index=mine,
        n_hosts=len(set(host_ids)),
    )
    return _state


def get() -> ParallelState:
    """The state from ``init()`` (initialising with defaults if nobody did)."""
    return _state if _state is not None else init()


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one error line on stderr and end every rank with a non-zero exit."""
    state = _state
    prefix = "tp-numa: error: "
    if state is None or state.world_size == 1:
        print(prefix + message, file=sys.stderr, flush=True)
        sys.exit(code)
    print(f"{prefix}[rank {state.rank}] {message}", file=sys.stderr, flush=True)
    mpi_comm().Abort(code)
    sys.exit(code)
