"""Python side of the shared-memory collectives (``torch.ops.tp_numa.shm_*``, csrc/comm).

One ``ShmGroup`` per host: every rank of the host owns a segment
``/dev/shm/tp_numa-<job>.<local rank>`` (mode 0600; slot for collective s is s % 2 of
two ``slot_bytes`` halves), all ranks map all segments, then the names are unlinked at
once, so nothing is left in /dev/shm even if a rank is killed with SIGKILL later.

Waiting is spin-then-``sched_yield``; a waiting rank gives up with an error when the
peer it waits for has exited or has shown no heartbeat for ``TP_NUMA_COMM_TIMEOUT``
seconds (default 5), or when any rank of the host called ``parallel_state.fail()``.

Environment: ``TP_NUMA_COMM_TIMEOUT`` (s), ``TP_NUMA_SHM_SLOT_MB`` (default 4; larger
collectives go in pieces), ``TP_NUMA_SHM_SPIN`` (busy polls before yielding, default
2000), ``TP_NUMA_SHM_TWO_PHASE_BYTES`` (all-reduce size from which each rank reduces
only its chunk, default 32 KiB).
"""
from __future__ import annotations

import atexit
import os
import secrets

import torch

from .._ext import load_extension, ops_registered
from ..errors import TpNumaError

_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def available() -> bool:
    """True when the native extension with the shm ops is importable."""
    return ops_registered("shm_all_reduce")


def comm_timeout() -> float:
    """Liveness timeout in seconds from ``TP_NUMA_COMM_TIMEOUT`` (default 5)."""
    raw = os.environ.get("TP_NUMA_COMM_TIMEOUT", "5")
    try:
        value = float(raw)
    except ValueError:
        raise TpNumaError(f"TP_NUMA_COMM_TIMEOUT={raw!r}: expected seconds (a number > 0)") from None
    if value <= 0:
        raise TpNumaError(f"TP_NUMA_COMM_TIMEOUT={raw!r}: expected seconds (a number > 0)")
    return value


def _slot_bytes() -> int:
    raw = os.environ.get("TP_NUMA_SHM_SLOT_MB", "4")
    try:
        mb = float(raw)
    except ValueError:
        raise TpNumaError(f"TP_NUMA_SHM_SLOT_MB={raw!r}: expected a size in MiB") from None
    n = int(mb * (1 << 20)) // 4096 * 4096
    if n < 4096:
        raise TpNumaError(f"TP_NUMA_SHM_SLOT_MB={raw!r}: at least 4 KiB")
    return n


_fast_cache: dict | None = None


def _fast_functions() -> dict:
    """Builtins for the hot collectives, bypassing op dispatch (see csrc/comm/shm_python.cpp).

    The extension exposes a PyMethodDef table by address; each entry becomes a builtin
    through the C API's PyCFunction_NewEx. ``TP_NUMA_SHM_FAST=0`` (or an extension
    without the table) keeps the registered ops.
    """
    global _fast_cache
    if _fast_cache is not None:
        return _fast_cache
    _fast_cache = {}
    if os.environ.get("TP_NUMA_SHM_FAST", "1") == "0" or not hasattr(torch.ops.tp_numa, "shm_fast_path_table"):
        return _fast_cache
    import ctypes

    class _MethodDef(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("meth", ctypes.c_void_p), ("flags", ctypes.c_int), ("doc", ctypes.c_char_p)]

    new = ctypes.pythonapi.PyCFunction_NewEx
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    table = (_MethodDef * 8).from_address(int(torch.ops.tp_numa.shm_fast_path_table()))
    for i, entry in enumerate(table):
        if not entry.name:
            break
        fn = new(ctypes.addressof(table) + i * ctypes.sizeof(_MethodDef), None, None)
        _fast_cache[entry.name.decode()] = fn
    return _fast_cache


class ShmGroup:
    """The ranks of one host, joined through shared memory. Ranks are local (0..size-1)."""

    def __init__(self, handle: int, local_rank: int, size: int, prefix: str):
        self.handle = handle
        self.local_rank = local_rank
        self.size = size
        self.prefix = prefix
        self._ops = torch.ops.tp_numa
        fast = _fast_functions()
        self._all_reduce = fast.get("shm_all_reduce", torch.ops.tp_numa.shm_all_reduce.default)
        self._broadcast = fast.get("shm_broadcast", torch.ops.tp_numa.shm_broadcast.default)
        self._all_gather = torch.ops.tp_numa.shm_all_gather.default

    @classmethod
    def create(cls, host_comm, global_ranks: list[int] | None = None) -> "ShmGroup":
        """Collective over ``host_comm`` (mpi4py communicator of one host's ranks).

        Creates, maps and unlinks the segments; a failure on any rank raises
        ``TpNumaError`` on every rank (agreed over ``host_comm``, so nobody hangs).
        """
        load_extension()
        local_rank, size = host_comm.Get_rank(), host_comm.Get_size()
        if global_ranks is None:
            from mpi4py import MPI

            global_ranks = host_comm.allgather(MPI.COMM_WORLD.Get_rank())
        # unique per job and host: random from the host leader, plus its pid for humans
        token = f"{os.getpid()}-{secrets.token_hex(6)}" if local_rank == 0 else None
        prefix = "/tp_numa-" + host_comm.bcast(token, root=0)
        timeout = comm_timeout()
        slot = _slot_bytes()

        def agree(step: str, fn) -> None:
            err = None
            try:
                fn()
            except (RuntimeError, OSError) as e:
                err = f"shared-memory setup ({step}) failed on rank {global_ranks[local_rank]}: {e}"
            errors = [e for e in host_comm.allgather(err) if e]
            if errors:
                raise TpNumaError(errors[0])

        box: dict = {}
        agree("create", lambda: box.setdefault("h", torch.ops.tp_numa.shm_create(prefix, local_rank, global_ranks, slot, timeout)))
        handle = box["h"]
        agree("attach", lambda: torch.ops.tp_numa.shm_attach(handle))
        torch.ops.tp_numa.shm_unlink(handle)  # every rank has mapped every segment
        group = cls(handle, local_rank, size, prefix)
        atexit.register(group.close)
        return group

    def close(self) -> None:
        """Stop the heartbeat and unmap (idempotent; also run at exit)."""
        if self.handle is not None:
            self._ops.shm_destroy(self.handle)
            self.handle = None

    def signal_abort(self, rank: int) -> bool:
        """Tell every rank of this host that global rank ``rank`` is failing; True if
        this rank is the first of its host to fail."""
        if self.handle is None:
            return True
        return bool(self._ops.shm_signal_abort(self.handle, rank))

    # collectives ----------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> None:
        """In place, sum over the host's ranks; contiguous float32/bfloat16/float16."""
        try:
            self._all_reduce(t, self.handle)
        except RuntimeError as e:
            raise _comm_error(e) from None

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        """In place, from local rank ``src``; any dtype, contiguous."""
        try:
            self._broadcast(t, self.handle, src)
        except RuntimeError as e:
            raise _comm_error(e) from None

    def all_gather(self, x: torch.Tensor, sizes: list[int], root: int = -1) -> torch.Tensor | None:
        """x: (sizes[local_rank], *rest) contiguous -> (sum(sizes), *rest), on every rank
        (root < 0) or on ``root`` only (None elsewhere)."""
        receive = root < 0 or root == self.local_rank
        if receive:
            out = torch.empty((sum(sizes),) + tuple(x.shape[1:]), dtype=x.dtype)
        else:
            out = x.new_empty((0,))
        try:
            self._all_gather(x, out, self.handle, sizes, root)
        except RuntimeError as e:
            raise _comm_error(e) from None
        return out if receive else None


class CommError(TpNumaError):
    """A collective could not complete: a peer exited, stopped responding, or failed first."""


def _comm_error(e: RuntimeError) -> CommError:
    # the first line is the kernel's message; torch may append a C++ stack below it
    return CommError(str(e).strip().splitlines()[0] if str(e).strip() else "shared-memory collective failed")


def _register_fakes() -> None:
    """Fake (meta) implementations so torch.compile can trace through the ops."""
    try:
        load_extension()
    except TpNumaError:
        return
    if not hasattr(torch.ops.tp_numa, "shm_all_reduce"):
        return

    @torch.library.register_fake("tp_numa::shm_all_reduce")
    def _(t, handle):
        torch._check(t.dtype in _FLOAT_TYPES, lambda: f"shm_all_reduce: dtype {t.dtype}")
        return None

    @torch.library.register_fake("tp_numa::shm_broadcast")
    def _(t, handle, src):
        return None

    @torch.library.register_fake("tp_numa::shm_all_gather")
    def _(t, out, handle, sizes, root):
        return None


_register_fakes()
