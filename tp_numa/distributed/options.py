"""Command-line options of the distributed layer, for commands that run a model.

    from tp_numa.distributed import options
    options.add_arguments(parser)        # --comm, --simulate-hosts, --ranks-per-host
    state = options.init_from_args(args) # parallel_state.init(...) + communicator.configure(...)

The same settings exist as environment variables (TP_NUMA_COMM, TP_NUMA_SIMULATE_HOSTS,
TP_NUMA_RANKS_PER_HOST), which reach every rank through `mpirun -x`. Flags win.
"""
from __future__ import annotations

import argparse

from . import communicator, parallel_state


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (under mpirun)")
    g.add_argument("--comm", choices=("auto", "shm", "mpi"), default=None,
                   help="collectives inside a host: shared memory (auto, shm) or MPI (default: auto)")
    g.add_argument("--simulate-hosts", action="store_true",
                   help="count every rank as its own host, to exercise the cross-host (MPI) path")
    g.add_argument("--ranks-per-host", type=int, default=None, metavar="K",
                   help="pretend hosts of K consecutive ranks (shm inside, MPI between)")


def init_from_args(args) -> parallel_state.ParallelState:
    """Apply the options: choose the communicator backend and initialise the ranks."""
    if getattr(args, "comm", None):
        communicator.configure(args.comm)
    hosts_per_rank = True if getattr(args, "simulate_hosts", False) else None
    return parallel_state.init(hosts_per_rank=hosts_per_rank, ranks_per_host=getattr(args, "ranks_per_host", None))
