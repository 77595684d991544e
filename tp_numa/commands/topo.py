"""Show this host's NUMA nodes (CPUs, memory) and the mpirun line to run one rank per node.

tp_numa binds each rank to its node itself, so the launcher should not bind
(`--bind-to none`); launcher binding to the node (`--map-by ppr:1:numa --bind-to numa`)
works too. Under mpirun, every rank reports where `setup_rank` would place it.
"""
from __future__ import annotations

import argparse
import json
import os

from .. import memory
from ..distributed import numa, parallel_state


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--command", default="tp-numa generate -m MODEL -p PROMPT", metavar="CMD",
                   help="command to put in the suggested mpirun lines (default: %(default)r)")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def mpirun_lines(n_nodes: int, cmd: str) -> dict[str, str]:
    """Recommended launch lines for one rank per NUMA node of this host."""
    n = max(1, n_nodes)
    return {
        "openmpi": f"mpirun -np {n} --bind-to none {cmd}",
        "openmpi (launcher binds)": f"mpirun -np {n} --map-by ppr:1:numa --bind-to numa {cmd}",
        "mpich": f"mpiexec -n {n} -bind-to none {cmd}",
        "mpich (launcher binds)": f"mpiexec -n {n} -map-by numa -bind-to numa {cmd}",
    }


def run(args) -> int:
    st = parallel_state.init()
    nodes = numa.read_topology()
    allowed = sorted(os.sched_getaffinity(0))
    placements = []
    for r in range(st.local_size):
        node, cpus, shared = numa.plan(nodes, r, st.local_size, set(allowed))
        placements.append({"local_rank": r, "node": node.id, "cpus": numa.format_cpulist(cpus), "shared": shared})
    lines = mpirun_lines(len(nodes), args.command)
    if not st.is_main:
        return 0
    if args.json:
        print(json.dumps({
            "nodes": [{"id": n.id, "cpus": numa.format_cpulist(n.cpus), "n_cpus": len(n.cpus),
                       "mem_total": n.mem_total, "mem_free": n.mem_free} for n in nodes],
            "allowed_cpus": numa.format_cpulist(allowed),
            "ranks_on_this_host": st.local_size,
            "placements": placements,
            "mpirun": lines,
            "transparent_huge_pages": memory.thp_mode(),
        }, indent=2))
        return 0
    print(f"NUMA nodes: {len(nodes)}   (CPUs this process may use: {numa.format_cpulist(allowed)})")
    print(f"{'node':>4}  {'cores':>5}  {'cpus':<24} {'memory':>10}  {'free':>10}")
    for n in nodes:
        print(f"{n.id:>4}  {len(n.cpus):>5}  {numa.format_cpulist(n.cpus):<24} {_gib(n.mem_total):>10}  {_gib(n.mem_free):>10}")
    print()
    if st.world_size > 1:
        print(f"this job: {st.world_size} ranks, {st.local_size} on this host:")
        for p in placements:
            tag = "  (shares its node)" if p["shared"] else ""
            print(f"  local rank {p['local_rank']}: node {p['node']}, cpus {p['cpus']}{tag}")
        print()
    if len(nodes) == 1:
        print("One NUMA node: a single rank already has all the memory bandwidth, so run")
        print(f"  {args.command}")
        print("without mpirun. (mpirun -np N still works here, for testing: ranks share the node.)")
        print()
    print(f"Recommended launch (one rank per node, {len(nodes)} rank{'s' if len(nodes) > 1 else ''}):")
    for name, line in lines.items():
        print(f"  {name + ':':<26} {line}")
    print("Threads per rank default to the cores of its node (--threads to change).")
    thp = memory.thp_mode()
    if thp in ("always", "madvise"):
        print(f"Transparent huge pages: {thp}: weights go on 2 MiB pages (TP_NUMA_HUGEPAGES=0 to disable).")
    else:
        print(f"Transparent huge pages: {thp or 'unknown'}: weights stay on 4 KiB pages; "
              "'echo madvise > /sys/kernel/mm/transparent_hugepage/enabled' (root) enables them.")
    print("Several hosts: see docs/launch.md (ranks = hosts x nodes, --host a:N,b:N).")
    return 0
