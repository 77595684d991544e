"""Process group state: which rank this is, how many there are, where they live.

World size 1 (plain `tp-numa ...`) needs no MPI launcher and never imports mpi4py.
Under `mpirun`, MPI is initialised through mpi4py and every rank is one tensor-parallel
shard (tp = world size).

Ranks on the same host form a *host group* (they talk through shared memory); the first
rank of each host is its *leader* (leaders talk over MPI). ``init(hosts_per_rank=True)``
or ``TP_NUMA_SIMULATE_HOSTS=1`` makes every rank its own host, so the cross-host path
runs on one machine.

Failure discipline: ``fail(msg)`` prints one line and ends every rank; ``check_all(ok,
msg)`` is the agreement step for errors every rank may hit at the same point (loading).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import NoReturn

from ..errors import TpNumaError

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")

# fixed bytes per rank in the failure agreement (a message longer than this is cut)
_FAIL_MSG_BYTES = 4096


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

    @property
    def is_host_leader(self) -> bool:
        return self.local_rank == 0


_state: ParallelState | None = None
_host_comm = None      # MPI communicator of the ranks on this host
_leader_comm = None    # MPI communicator of the host leaders (None on other ranks)
_fail_comm = None      # private duplicate of COMM_WORLD, used only by fail()
_abort_hooks: list = []  # callables(rank) run by fail() before it ends the job


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def mpi_comm():
    """COMM_WORLD of mpi4py (only valid when world size > 1 or launched by mpirun)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def init(hosts_per_rank: bool | None = None, ranks_per_host: int | None = None) -> ParallelState:
    """Initialise once.

    ``hosts_per_rank`` makes every rank count as its own host (to test the cross-host
    path on one machine); ``None`` reads ``TP_NUMA_SIMULATE_HOSTS`` (1/true). A wider
    simulation: ``ranks_per_host=k`` (or ``TP_NUMA_RANKS_PER_HOST=k``) groups ranks
    k at a time into pretend hosts, so both the shm and the MPI legs run.
    """
    global _state, _host_comm, _leader_comm, _fail_comm
    if _state is not None:
        return _state
    if hosts_per_rank is None:
        hosts_per_rank = _env_flag("TP_NUMA_SIMULATE_HOSTS")
    if ranks_per_host is None:
        raw = os.environ.get("TP_NUMA_RANKS_PER_HOST", "").strip()
        if raw:
            try:
                ranks_per_host = int(raw)
            except ValueError:
                raise TpNumaError(f"TP_NUMA_RANKS_PER_HOST={raw!r}: expected a positive integer") from None
    if hosts_per_rank:
        ranks_per_host = 1
    if ranks_per_host is not None and ranks_per_host < 1:
        raise TpNumaError(f"ranks per simulated host must be >= 1, got {ranks_per_host}")
    if not launched_by_mpi():
        _state = ParallelState()
        return _state
    from mpi4py import MPI

    comm = mpi_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    if ranks_per_host is not None:
        host_ids = [r // ranks_per_host for r in range(size)]
    else:
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
    _host_comm = comm.Split(color=mine, key=rank)
    leader = comm.Split(color=0 if _state.local_rank == 0 else MPI.UNDEFINED, key=rank)
    _leader_comm = None if leader == MPI.COMM_NULL else leader
    _fail_comm = comm.Dup()
    return _state


def get() -> ParallelState:
    """The state from ``init()`` (initialising with defaults if nobody did)."""
    return _state if _state is not None else init()


def host_comm():
    """MPI communicator of this host's ranks (``None`` at world size 1)."""
    get()
    return _host_comm


def leader_comm():
    """MPI communicator of the host leaders; ``None`` on ranks that are not a leader."""
    get()
    return _leader_comm


def add_abort_hook(hook) -> None:
    """Register ``hook(rank) -> bool``: run by ``fail()`` to tell peers at once that this
    rank is going down (the shm group sets its abort word). Returns True when this rank
    was the first of its host to fail (so it is the one to report)."""
    _abort_hooks.append(hook)


def check_all(ok: bool, message: str = "") -> None:
    """Agreement step for errors that may strike any subset of ranks at the same point.

    Every rank must call it. If any rank passes ``ok=False``, every rank raises
    ``TpNumaError`` with the message of the lowest failing rank, so the error is the same
    everywhere and ``fail()`` prints it once (rank 0) and exits all ranks non-zero.
    """
    state = get()
    if state.world_size == 1:
        if not ok:
            raise TpNumaError(message)
        return
    results = mpi_comm().allgather((bool(ok), message))
    for good, msg in results:
        if not good:
            raise TpNumaError(msg)


def _agree_on_failure(rank: int, primary: bool, message: str, wait_s: float):
    """Non-blocking all-gather of (primary, message) on the private failure communicator.

    Completes only if every rank reaches ``fail()`` within ``wait_s`` (an error all ranks
    hit at the same point). Returns the list of (primary, message) per rank, or None.
    A rank that gave up waiting has already acted alone (printed, or left quietly), but
    its contribution may still complete the collective for late ranks (a stopped peer
    that is resumed, say): so the posting times travel along, and a gathering whose
    posts lie more than ``wait_s`` apart does not count as an agreement.
    """
    import numpy as np

    size = _fail_comm.Get_size()
    mine = np.zeros(_FAIL_MSG_BYTES, dtype=np.uint8)
    data = message.encode("utf-8", "replace")[: _FAIL_MSG_BYTES - 9]
    mine[0] = 1 if primary else 0
    mine[1:9] = np.frombuffer(np.float64(time.time()).tobytes(), dtype=np.uint8)
    mine[9 : 9 + len(data)] = np.frombuffer(data, dtype=np.uint8)
    everyone = np.zeros((size, _FAIL_MSG_BYTES), dtype=np.uint8)
    request = _fail_comm.Iallgather(mine, everyone)
    deadline = time.monotonic() + wait_s
    while not request.Test():
        if time.monotonic() > deadline:
            return None  # someone is elsewhere; the request is abandoned with the job
        time.sleep(0.002)
    posted = [float(np.frombuffer(bytes(row[1:9]), dtype=np.float64)[0]) for row in everyone]
    if max(posted) - min(posted) > wait_s:
        return None  # an early rank gave up on this agreement and acted alone
    out = []
    for row in everyone:
        text = bytes(row[9:]).split(b"\0", 1)[0].decode("utf-8", "replace")
        out.append((bool(row[0]), text))
    return out


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one error line on stderr and end every rank with a non-zero exit.

    - World size 1: print and exit.
    - Every rank failing at the same point (all reach ``fail()`` within
      ``TP_NUMA_FAIL_AGREE_S``, default 1 s): rank 0 prints the first primary message,
      all ranks exit with ``code`` (no MPI abort, no launcher noise).
    - Otherwise (one rank fails alone): it tells its host's peers through the shm abort
      word (so none of them waits on it), prints its message, and calls MPI Abort, which
      ends the whole job.
    A rank that learns of a peer's failure (not the first to fail on its host) is
    *secondary*: its own message is only a consequence and is not printed.
    """
    state = _state
    prefix = "tp-numa: error: "
    if state is None or state.world_size == 1 or _fail_comm is None:
        print(prefix + message, file=sys.stderr, flush=True)
        sys.exit(code)
    primary = True
    for hook in _abort_hooks:
        try:
            primary = bool(hook(state.rank)) and primary
        except Exception:  # a broken hook must not stop the abort
            pass
    try:
        wait_s = float(os.environ.get("TP_NUMA_FAIL_AGREE_S", "1.0"))
    except ValueError:
        wait_s = 1.0
    agreed = _agree_on_failure(state.rank, primary, message, wait_s)
    if agreed is not None:
        if state.rank == 0:
            chosen = next((m for p, m in agreed if p), agreed[0][1])
            print(prefix + chosen, file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # every rank is here and exits now; skipping interpreter/MPI teardown keeps the
        # shutdown short (the shm names are long unlinked, the launcher reaps the job)
        os._exit(code)
    if primary:
        print(f"{prefix}[rank {state.rank}] {message}", file=sys.stderr, flush=True)
        mpi_comm().Abort(code)
    else:
        # a peer failed first and is aborting the job; leave quietly and non-zero
        time.sleep(0.5)
        os._exit(code)
    sys.exit(code)
