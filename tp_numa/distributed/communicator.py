"""Collectives between the tensor-parallel ranks: the only place tensors cross ranks.

    all_reduce(t)              in place, t <- sum over ranks of t (fp32 accumulate)
    all_gather(t, dim)         concat over ranks along dim (ranks may differ in size there)
    gather_to_main(t, dim)     the same concat, on rank 0 only (None elsewhere)
    broadcast(t, src=0)        in place, t <- t of rank src
    broadcast_object(obj, src) any picklable object from rank src

World size 1: no-ops / identity, and mpi4py is never imported.

Paths (chosen once per process, the same on every rank):
- one host, several ranks: the shared-memory ops (``tp_numa.distributed.shm``);
- several hosts: hierarchical. All-reduce = shm all-reduce inside each host, MPI
  all-reduce between the host leaders, shm broadcast from the leader; all in fp32 so a
  bf16/fp16 tensor is rounded once, at the end. All-gather / broadcast of other roots go
  over MPI (COMM_WORLD);
- ``TP_NUMA_COMM=mpi`` (or ``configure("mpi")``) uses mpi4py everywhere (reference path).

Every rank gets bitwise the same all-reduce result (each element is summed by one rank
in rank order, or by MPI once), so the replicated parts of the model never drift apart.
"""
from __future__ import annotations

import os

import torch

from ..errors import TpNumaError
from . import parallel_state
from .shm import CommError  # noqa: F401  (re-exported: what a failed collective raises)

_BACKENDS = ("auto", "shm", "mpi")
_SHM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # others go over MPI
_requested = os.environ.get("TP_NUMA_COMM", "auto").strip().lower() or "auto"
_impl = None


def configure(backend: str = "auto") -> None:
    """Pick the intra-host path before the first collective: 'auto' (shm when the native
    op is built, else MPI), 'shm' (required) or 'mpi'."""
    global _requested, _impl
    backend = backend.strip().lower()
    if backend not in _BACKENDS:
        raise TpNumaError(f"--comm {backend!r}: expected one of {', '.join(_BACKENDS)}")
    if _impl is not None and backend != _requested:
        raise TpNumaError("communicator backend must be chosen before the first collective")
    _requested = backend


def backend_name() -> str:
    """'none' (world size 1), 'shm', 'mpi' or 'hierarchical' (shm + MPI between hosts).

    Not collective: before the first collective it says what will be used."""
    if _impl is not None:
        return _impl.name
    state = parallel_state.get()
    if state.world_size == 1:
        return "none"
    shm_ok = _requested != "mpi" and state.local_size > 1 and _shm_available()
    if state.n_hosts == 1:
        return "shm" if shm_ok else "mpi"
    return "hierarchical" if shm_ok else "mpi"


def _shm_available() -> bool:
    from . import shm

    return shm.available()


# ---- public API ---------------------------------------------------------------------


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; fp32/bf16/fp16 (accumulated in fp32) or fp64. Returns ``t``."""
    impl = _impl if _impl is not None else _get()
    if impl.world_size == 1:
        return t
    direct = impl.direct_all_reduce
    if direct is not None and t.dtype in _SHM_DTYPES and t.is_contiguous():
        # hot path (twice per layer): one host, shm op; the native side checks device/dtype
        direct(t)
        return t
    _check_cpu(t, "all_reduce")
    if not t.is_contiguous():
        tmp = t.contiguous()
        impl.all_reduce(tmp)
        t.copy_(tmp)
        return t
    impl.all_reduce(t)
    return t


def shm_all_reduce_handle() -> int | None:
    """The native shm group handle behind ``all_reduce`` when every all-reduce of this
    process goes straight to the shared-memory op (one host, several ranks), else None
    (world size 1, MPI, several hosts). Native code that all-reduces by itself
    (``tp_numa.layers.native_decode``) uses it; collective on its first call like any op."""
    impl = _impl if _impl is not None else _get()
    if impl.world_size == 1 or impl.direct_all_reduce is None:
        return None
    return int(impl.shm.handle)


def all_gather(t: torch.Tensor, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenation of every rank's ``t`` along ``dim`` (rank order), on every rank.

    Ranks may differ in ``t.shape[dim]`` (uneven partitions); ``sizes`` (each rank's
    extent along ``dim``) saves a small exchange when the caller knows them.
    """
    impl = _get()
    if impl.world_size == 1:
        return t
    return _gather(impl, t, dim, sizes, root=-1)


def gather_to_main(t: torch.Tensor, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor | None:
    """Like ``all_gather`` but only rank 0 receives the result; other ranks get None."""
    impl = _get()
    if impl.world_size == 1:
        return t
    return _gather(impl, t, dim, sizes, root=0)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank's ``t`` becomes rank ``src``'s ``t`` (same shape/dtype everywhere)."""
    impl = _get()
    if impl.world_size == 1:
        return t
    _check_cpu(t, "broadcast")
    if not 0 <= src < impl.world_size:
        raise TpNumaError(f"broadcast: src={src} is not a rank (world size {impl.world_size})")
    if not t.is_contiguous():
        tmp = t.contiguous()
        impl.broadcast(tmp, src)
        t.copy_(tmp)
        return t
    impl.broadcast(t, src)
    return t


def broadcast_object(obj, src: int = 0):
    """Any picklable object from rank ``src`` (returned on every rank)."""
    impl = _get()
    if impl.world_size == 1:
        return obj
    return impl.world.bcast(obj, root=src)


def barrier() -> None:
    """Wait for every rank (start-up / shutdown only; the collectives need no barrier)."""
    impl = _get()
    if impl.world_size > 1:
        impl.world.Barrier()


# ---- implementation -----------------------------------------------------------------


def _check_cpu(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu":
        raise TpNumaError(f"{what}: tensor on {t.device}; collectives run on CPU tensors")


def _gather(impl, t: torch.Tensor, dim: int, sizes, root: int):
    _check_cpu(t, "all_gather" if root < 0 else "gather_to_main")
    dim = dim % t.dim() if t.dim() else 0
    front = t.movedim(dim, 0).contiguous() if t.dim() else t.reshape(1)
    if sizes is None:
        sizes = impl.exchange_sizes(front.shape[0])
    else:
        sizes = [int(s) for s in sizes]
        if len(sizes) != impl.world_size or sizes[impl.rank] != front.shape[0]:
            raise TpNumaError(
                f"gather: sizes {sizes} do not match world size {impl.world_size} "
                f"and this rank's extent {front.shape[0]} along dim {dim}"
            )
    out = impl.gather_rows(front, sizes, root)
    if out is None:
        return None
    return out.movedim(0, dim) if t.dim() else out


def _np_bytes(t: torch.Tensor):
    """Flat uint8 numpy view of a contiguous CPU tensor (shares memory)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _mpi_allreduce_(comm, t: torch.Tensor) -> None:
    """In-place MPI sum; reduced-precision floats go through an fp32 copy."""
    from mpi4py import MPI

    if t.dtype in (torch.float32, torch.float64, torch.int32, torch.int64):
        comm.Allreduce(MPI.IN_PLACE, t.reshape(-1).numpy(), op=MPI.SUM)
        return
    if not t.is_floating_point():
        raise TpNumaError(f"all_reduce: unsupported dtype {t.dtype}")
    wide = t.float()
    comm.Allreduce(MPI.IN_PLACE, wide.reshape(-1).numpy(), op=MPI.SUM)
    t.copy_(wide)


class _Single:
    name = "none"
    world_size = 1
    rank = 0
    direct_all_reduce = None


class _Mpi:
    """mpi4py on COMM_WORLD, optionally the shm group inside each host (see module doc)."""

    def __init__(self, state: parallel_state.ParallelState, requested: str):
        self.world = parallel_state.mpi_comm()
        self.rank = state.rank
        self.world_size = state.world_size
        self.state = state
        self.shm = None
        if requested != "mpi" and state.local_size > 1:
            from . import shm

            if shm.available():
                self.shm = shm.ShmGroup.create(parallel_state.host_comm())
                parallel_state.add_abort_hook(self.shm.signal_abort)
            elif requested == "shm":
                raise TpNumaError("--comm shm: the shared-memory op is not in this build of tp_numa._C")
        # (host index, local rank) of every rank, to route broadcasts through leaders
        self.where = self.world.allgather((state.host_index, state.local_rank))
        self.leaders = parallel_state.leader_comm()
        if state.n_hosts == 1:
            self.name = "shm" if self.shm else "mpi"
        else:
            self.name = "hierarchical" if self.shm else "mpi"
        self.direct_all_reduce = self.shm.all_reduce if self.name == "shm" else None

    # all-reduce ---------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> None:
        st = self.state
        if st.n_hosts == 1:
            if self.shm is not None and t.dtype in _SHM_DTYPES:
                self.shm.all_reduce(t)
            else:
                _mpi_allreduce_(self.world, t)
            return
        if self.shm is None or not t.is_floating_point():
            _mpi_allreduce_(self.world, t)
            return
        # hierarchical, in fp32 (fp64 stays fp64) throughout so the tensor is rounded once at the end
        work = t if t.dtype in (torch.float32, torch.float64) else t.float()
        self.shm.all_reduce(work)
        if self.leaders is not None:
            _mpi_allreduce_(self.leaders, work)
        self.shm.broadcast(work, 0)
        if work is not t:
            t.copy_(work)

    # broadcast ----------------------------------------------------------------------
    def broadcast(self, t: torch.Tensor, src: int) -> None:
        st = self.state
        if st.n_hosts == 1:
            if self.shm is not None:
                self.shm.broadcast(t, src)
            else:
                self.world.Bcast(_np_bytes(t), root=src)
            return
        src_host, src_local = self.where[src]
        if self.shm is None or src_local != 0:
            self.world.Bcast(_np_bytes(t), root=src)
            return
        # leaders first (leader communicator rank == host index), then inside each host
        if self.leaders is not None:
            self.leaders.Bcast(_np_bytes(t), root=src_host)
        self.shm.broadcast(t, 0)

    # gathers ------------------------------------------------------------------------
    def exchange_sizes(self, n: int) -> list[int]:
        mine = torch.tensor([n], dtype=torch.int64)
        every = self.gather_rows(mine, [1] * self.world_size, -1)
        return [int(v) for v in every.tolist()]

    def gather_rows(self, x: torch.Tensor, sizes: list[int], root: int):
        """x: (sizes[rank], *rest) contiguous -> (sum(sizes), *rest) on all ranks (root<0)
        or on ``root`` only (None elsewhere)."""
        if self.state.n_hosts == 1 and self.shm is not None:
            return self.shm.all_gather(x, sizes, root)
        out_shape = (sum(sizes),) + tuple(x.shape[1:])
        row_bytes = _row_bytes(x)
        counts = [s * row_bytes for s in sizes]
        if root < 0:
            out = torch.empty(out_shape, dtype=x.dtype)
            self.world.Allgatherv(_np_bytes(x), [_np_bytes(out), counts])
            return out
        if self.rank == root:
            out = torch.empty(out_shape, dtype=x.dtype)
            self.world.Gatherv(_np_bytes(x), [_np_bytes(out), counts], root=root)
            return out
        self.world.Gatherv(_np_bytes(x), None, root=root)
        return None


def _row_bytes(x: torch.Tensor) -> int:
    n = x.element_size()
    for s in x.shape[1:]:
        n *= s
    return n


def _get():
    global _impl
    if _impl is None:
        state = parallel_state.get()
        _impl = _Single() if state.world_size == 1 else _Mpi(state, _requested)
    return _impl
