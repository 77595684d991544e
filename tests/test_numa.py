"""NUMA topology parsing, rank placement and binding (tp_numa.distributed.numa), `tp-numa topo`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_util import ROOT, mpirun_path, run_mpi
from tp_numa.distributed import numa


def test_cpulist_round_trip():
    assert numa.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert numa.parse_cpulist("") == []
    assert numa.format_cpulist([11, 10, 0, 1, 2, 3, 8]) == "0-3,8,10-11"
    assert numa.format_cpulist([5]) == "5"


def _fake_sysfs(tmp_path: Path) -> str:
    root = tmp_path / "node"
    for i, cpus, kb in [(0, "0-3", 1000), (1, "4-7", 2000), (2, "", 500)]:  # node 2: memory only
        d = root / f"node{i}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {i} MemTotal:       {kb} kB\nNode {i} MemFree:        {kb // 2} kB\n")
    (root / "possible").write_text("0-2\n")
    return str(root)


def test_read_topology_skips_memory_only_nodes(tmp_path):
    nodes = numa.read_topology(_fake_sysfs(tmp_path))
    assert [n.id for n in nodes] == [0, 1]
    assert nodes[1].cpus == [4, 5, 6, 7]
    assert nodes[1].mem_total == 2000 * 1024 and nodes[1].mem_free == 1000 * 1024


def test_read_topology_without_sysfs_is_one_node(tmp_path):
    nodes = numa.read_topology(str(tmp_path / "absent"))
    assert len(nodes) == 1 and nodes[0].cpus == sorted(os.sched_getaffinity(0))


def test_plan_one_rank_per_node(tmp_path):
    nodes = numa.read_topology(_fake_sysfs(tmp_path))
    assert numa.plan(nodes, 0, 2)[1:] == ([0, 1, 2, 3], False)
    node, cpus, shared = numa.plan(nodes, 1, 2)
    assert (node.id, cpus, shared) == (1, [4, 5, 6, 7], False)
    # a cpuset that hides some cores trims the node
    assert numa.plan(nodes, 1, 2, allowed={5, 6})[1] == [5, 6]


def test_plan_more_ranks_than_nodes(tmp_path):
    nodes = numa.read_topology(_fake_sysfs(tmp_path))
    got = [numa.plan(nodes, r, 4) for r in range(4)]
    assert [(n.id, c, s) for n, c, s in got] == [
        (0, [0, 1], True), (1, [4, 5], True), (0, [2, 3], True), (1, [6, 7], True)]
    # one node with 2 cores, 3 ranks: round-robin, cores carry several ranks
    one = [numa.Node(0, [0, 1])]
    assert [numa.plan(one, r, 3)[1] for r in range(3)] == [[0], [1], [0]]


_PROBE = r"""
import os, sys, torch
from tp_numa.distributed import numa
b = numa.setup_rank({threads})
policy = ""
with open("/proc/self/numa_maps") as f:
    for line in f:
        if "heap" in line or "anon" in line:
            policy = line.split()[1]
            break
print("CPUS", sorted(os.sched_getaffinity(0)), "THREADS", torch.get_num_threads(), "POLICY", b.mempolicy, policy)
"""


def _probe(threads="None", env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        e.pop(k, None)
    return subprocess.run([sys.executable, "-c", _PROBE.format(threads=threads)], env=e,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(len(numa.read_topology()) > 1, reason="world size 1 stays unbound on multi-node hosts")
def test_setup_rank_binds_cpus_threads_and_memory():
    nodes = numa.read_topology()
    r = _probe()
    assert r.returncode == 0, r.stderr
    cpus = sorted(set(nodes[0].cpus) & os.sched_getaffinity(0)) or nodes[0].cpus
    assert f"CPUS {cpus} THREADS {len(cpus)} POLICY bind" in r.stdout, r.stdout
    # the kernel's view of the main thread's policy: numa_maps shows bind:<node>
    assert f"bind:{nodes[0].id}" in r.stdout, r.stdout
    r = _probe(threads="1", env={"TP_NUMA_MEMPOLICY": "preferred"})
    assert r.returncode == 0, r.stderr
    assert "THREADS 1 POLICY preferred" in r.stdout and f"prefer:{nodes[0].id}" in r.stdout, r.stdout


def test_setup_rank_rejects_bad_options():
    r = _probe(env={"TP_NUMA_MEMPOLICY": "everywhere"})
    assert r.returncode != 0 and "TP_NUMA_MEMPOLICY" in r.stderr
    r = _probe(threads="0")
    assert r.returncode != 0 and "--threads" in r.stderr


def test_topo_command_prints_nodes_and_mpirun_lines():
    r = subprocess.run([sys.executable, "-m", "tp_numa.cli", "topo"], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n = len(numa.read_topology())
    assert f"NUMA nodes: {n}" in r.stdout
    assert f"mpirun -np {n} --bind-to none" in r.stdout
    assert f"mpiexec -n {n} -bind-to none" in r.stdout
    assert "--map-by ppr:1:numa --bind-to numa" in r.stdout


@pytest.mark.mpi
@pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found")
def test_oversubscribed_ranks_split_cores_and_warn_once():
    n_nodes = len(numa.read_topology())
    np_ = n_nodes + 1
    r = run_mpi(np_, "bind_check.py", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("ranks share nodes") == 1, r.stderr
    lines = sorted(l for l in r.stdout.splitlines() if l.startswith("RANK"))
    assert len(lines) == np_, r.stdout
