"""NUMA topology of this host and the binding of each rank to its node.

Topology comes from ``/sys/devices/system/node`` (``node<i>/cpulist``, ``node<i>/meminfo``);
without it (some containers) the host counts as one node holding the CPUs this process
may use. No numactl / libnuma dependency: binding is ``os.sched_setaffinity`` plus the
``set_mempolicy`` system call through ctypes.

``setup_rank(threads)`` runs once per rank right after ``parallel_state.init()`` and
before any weight is loaded:
- local rank i of a host with at least as many nodes as ranks gets node i: all of its
  CPUs, memory policy bound to it (``TP_NUMA_MEMPOLICY=bind`` (default) | ``preferred``
  | ``none``), and ``torch.set_num_threads(cores of the node)`` unless ``threads`` is given;
- with more ranks than nodes (a 1-node box under ``mpirun -np 2``), rank i goes to
  node i % n_nodes and the ranks sharing a node split its CPUs round-robin; rank 0 prints
  one warning, since such a run cannot gain bandwidth from tensor parallelism.

Affinity is applied to every existing thread of the process (``/proc/self/task``), so a
thread pool created before the call moves too; threads created later inherit it. The
memory policy is per thread and set on the calling (main) thread; other threads keep the
default "local" policy, which is the same node since they may only run on its CPUs.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from dataclasses import dataclass, field

from ..errors import TpNumaError

NODE_ROOT = "/sys/devices/system/node"

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND = 0, 1, 2
_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "ppc64le": 261, "s390x": 270, "riscv64": 237}
_MASK_BITS = 1024  # nodemask width passed to set_mempolicy (>= any real MAX_NUMNODES use)


@dataclass
class Node:
    id: int
    cpus: list[int]
    mem_total: int = 0   # bytes
    mem_free: int = 0    # bytes


@dataclass
class BindingInfo:
    """What ``setup_rank`` did for this rank."""

    rank: int
    local_rank: int
    node: int                      # NUMA node this rank's memory is tied to
    cpus: list[int]                # CPUs its threads may run on
    threads: int                   # torch intra-op threads
    mempolicy: str                 # 'bind' | 'preferred' | 'none' | 'failed: ...'
    shared_node: bool = False      # more ranks than nodes on this host
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"rank {self.rank}: node {self.node}, cpus {format_cpulist(self.cpus)}, "
                f"{self.threads} threads, mempolicy {self.mempolicy}")

    __str__ = describe


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return sorted(set(out))


def format_cpulist(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    cpus = sorted(set(cpus))
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def _meminfo(path: str) -> tuple[int, int]:
    total = free = 0
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                # per node: "Node 0 MemTotal:  123 kB"; /proc/meminfo: "MemTotal:  123 kB"
                key = fields[2] if fields[0] == "Node" else fields[0]
                value = int(fields[-2]) * 1024 if fields[-1] == "kB" else int(fields[-1])
                if key == "MemTotal:":
                    total = value
                elif key == "MemFree:":
                    free = value
    except (OSError, ValueError, IndexError):
        pass
    return total, free


def read_topology(root: str = NODE_ROOT) -> list[Node]:
    """NUMA nodes that have CPUs, in id order. Falls back to one node."""
    nodes: list[Node] = []
    try:
        names = os.listdir(root)
    except OSError:
        names = []
    for name in names:
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        path = os.path.join(root, name)
        try:
            with open(os.path.join(path, "cpulist")) as f:
                cpus = parse_cpulist(f.read())
        except (OSError, ValueError):
            continue
        if not cpus:
            continue  # memory-only node (CXL, HBM): no rank goes there
        total, free = _meminfo(os.path.join(path, "meminfo"))
        nodes.append(Node(int(name[4:]), cpus, total, free))
    if not nodes:
        total, free = _meminfo("/proc/meminfo")
        nodes = [Node(0, sorted(os.sched_getaffinity(0)), total, free)]
    nodes.sort(key=lambda n: n.id)
    return nodes


def plan(nodes: list[Node], local_rank: int, local_size: int, allowed: set[int] | None = None) -> tuple[Node, list[int], bool]:
    """Node and CPUs of ``local_rank`` among ``local_size`` ranks of this host.

    Returns (node, cpus, shared). ``allowed`` (the CPUs this process may use, e.g. a
    cgroup cpuset) trims each node's CPUs when that leaves any.
    """
    usable = []
    for n in nodes:
        cpus = [c for c in n.cpus if allowed is None or c in allowed] or n.cpus
        usable.append((n, cpus))
    if local_size <= len(usable):
        node, cpus = usable[local_rank]
        return node, cpus, False
    node, cpus = usable[local_rank % len(usable)]
    sharers = [r for r in range(local_size) if r % len(usable) == local_rank % len(usable)]
    k, slot = len(sharers), sharers.index(local_rank)
    if len(cpus) >= k:
        # contiguous, as even as possible: sharer j gets cpus[j*len/k : (j+1)*len/k]
        lo, hi = slot * len(cpus) // k, (slot + 1) * len(cpus) // k
        return node, cpus[lo:hi], True
    # fewer cores than ranks on this node: round-robin, cores carry several ranks
    return node, [cpus[slot % len(cpus)]], True


def set_mempolicy(mode: int, node: int | None) -> None:
    """set_mempolicy(2) for the calling thread; raises OSError on failure."""
    nr = _SET_MEMPOLICY.get(platform.machine())
    if nr is None:
        raise OSError(f"set_mempolicy: unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    words = _MASK_BITS // (8 * ctypes.sizeof(ctypes.c_ulong))
    mask = (ctypes.c_ulong * words)()
    if node is not None:
        bits = 8 * ctypes.sizeof(ctypes.c_ulong)
        mask[node // bits] |= 1 << (node % bits)
    # the kernel reads maxnode - 1 bits
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(mode), mask if node is not None else None,
                       ctypes.c_ulong(_MASK_BITS + 1 if node is not None else 0))
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"set_mempolicy: {os.strerror(err)}")


def _set_affinity_all_threads(cpus: list[int]) -> None:
    """Pin every thread of this process (Linux affinity is per thread)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            pass  # thread ended meanwhile
    os.sched_setaffinity(0, cpus)


_binding: BindingInfo | None = None


def setup_rank(threads: int | None = None) -> BindingInfo:
    """Bind this rank to its node (CPUs + memory) and set its thread count. Call once,
    right after ``parallel_state.init()`` and before loading weights. Idempotent."""
    global _binding
    if _binding is not None:
        return _binding
    import torch

    from . import parallel_state

    if threads is not None and threads < 1:
        raise TpNumaError(f"--threads {threads}: must be at least 1")
    st = parallel_state.get()
    nodes = read_topology()
    allowed = set(os.sched_getaffinity(0))
    policy = os.environ.get("TP_NUMA_MEMPOLICY", "bind").strip().lower()
    if policy not in ("bind", "preferred", "none"):
        raise TpNumaError(f"TP_NUMA_MEMPOLICY={policy!r}: expected bind, preferred or none")
    notes: list[str] = []

    if st.world_size == 1 and len(nodes) > 1:
        # a single rank on a multi-node host: it uses the whole machine, no binding
        node, cpus, shared = nodes[0], sorted(allowed), False
        policy = "none"
        notes.append(f"world size 1 on {len(nodes)} NUMA nodes: not bound (run one rank per node for TP)")
    else:
        node, cpus, shared = plan(nodes, st.local_rank, st.local_size, allowed)
        try:
            _set_affinity_all_threads(cpus)
        except OSError as e:
            notes.append(f"cannot set CPU affinity to {format_cpulist(cpus)}: {e}")
            cpus = sorted(os.sched_getaffinity(0))
    if policy != "none":
        try:
            set_mempolicy(MPOL_BIND if policy == "bind" else MPOL_PREFERRED, node.id)
        except OSError as e:
            notes.append(f"cannot set memory policy ({policy} to node {node.id}): {e}")
            policy = f"failed: {e}"
    n_threads = threads if threads is not None else len(cpus)
    torch.set_num_threads(n_threads)
    if shared and st.rank == 0:
        print(f"tp-numa: warning: {st.local_size} ranks on {len(nodes)} NUMA node(s) of this host; "
              f"ranks share nodes and split their cores ({format_cpulist(cpus)} for rank 0), so tensor "
              "parallelism brings no memory-bandwidth gain here", file=sys.stderr, flush=True)
    if st.rank == 0:
        for note in notes:
            print(f"tp-numa: warning: {note}", file=sys.stderr, flush=True)
    _binding = BindingInfo(st.rank, st.local_rank, node.id, list(cpus), n_threads, policy, shared, notes)
    return _binding


def binding() -> BindingInfo | None:
    """The result of ``setup_rank`` (None before it ran)."""
    return _binding
