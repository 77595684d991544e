"""Collectives (tp_numa.distributed.communicator) and the shared-memory op.

Under mpirun, tests/comm_scripts/collectives_check.py compares every collective with a
plain oracle (fp32 sum in rank order, concatenation, the source's tensor) over a random
rank-identical mix of ops, sizes and dtypes: one host through the shm op (exact), the
hierarchical path (pretend hosts of 2 ranks: shm + MPI), all-MPI paths (within one
rounding). Single-process tests cover world size 1, segment naming/permissions and
opcheck of the registered ops on a one-rank group.
"""
import os
import stat

import pytest
import torch

from mpi_util import mpirun_path, run_mpi

needs_mpi = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found")


def _shm_ops_built() -> bool:
    from tp_numa.distributed import shm

    return shm.available()


needs_shm = pytest.mark.skipif(not _shm_ops_built(), reason="tp_numa._C without the shm ops")


def test_world_size_one_is_identity():
    from tp_numa.distributed import communicator as C
    from tp_numa.distributed import parallel_state

    if parallel_state.launched_by_mpi():
        pytest.skip("running under an MPI launcher")
    assert parallel_state.get().world_size == 1
    t = torch.arange(6.0).reshape(2, 3)
    before = t.clone()
    assert C.all_reduce(t) is t and torch.equal(t, before)
    assert C.all_gather(t, 1) is t
    assert C.gather_to_main(t, 0) is t
    assert C.broadcast(t, 0) is t and torch.equal(t, before)
    assert C.broadcast_object({"a": 1}) == {"a": 1}
    assert C.backend_name() == "none"


@needs_shm
def test_segment_is_0600_and_unlinked_after_unlink():
    from tp_numa.distributed import shm

    shm.load_extension()
    prefix = f"/tp_numa-test-{os.getpid()}"
    old = os.umask(0)  # the op must not rely on the umask for 0600
    try:
        h = torch.ops.tp_numa.shm_create(prefix, 0, [0], 1 << 16, 5.0)
    finally:
        os.umask(old)
    try:
        path = "/dev/shm" + prefix + ".0"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        torch.ops.tp_numa.shm_attach(h)
        torch.ops.tp_numa.shm_unlink(h)
        assert not os.path.exists(path)
    finally:
        torch.ops.tp_numa.shm_destroy(h)


@needs_shm
def test_create_refuses_an_existing_name():
    from tp_numa.distributed import shm

    shm.load_extension()
    prefix = f"/tp_numa-test-dup-{os.getpid()}"
    h = torch.ops.tp_numa.shm_create(prefix, 0, [0], 1 << 16, 5.0)
    try:
        with pytest.raises(RuntimeError, match="cannot create"):
            torch.ops.tp_numa.shm_create(prefix, 0, [0], 1 << 16, 5.0)
    finally:
        torch.ops.tp_numa.shm_destroy(h)
    assert not os.path.exists("/dev/shm" + prefix + ".0")


@needs_shm
def test_opcheck_on_one_rank_group():
    from tp_numa.distributed import shm

    shm.load_extension()
    h = torch.ops.tp_numa.shm_create(f"/tp_numa-test-op-{os.getpid()}", 0, [0], 1 << 16, 5.0)
    torch.ops.tp_numa.shm_attach(h)
    torch.ops.tp_numa.shm_unlink(h)
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            torch.library.opcheck(torch.ops.tp_numa.shm_all_reduce.default, (torch.randn(33).to(dtype), h))
        torch.library.opcheck(torch.ops.tp_numa.shm_broadcast.default, (torch.randn(5, 3), h, 0))
        x = torch.randn(4, 3)
        out = torch.empty(4, 3)
        torch.library.opcheck(torch.ops.tp_numa.shm_all_gather.default, (x, out, h, [4], -1))
        torch.ops.tp_numa.shm_all_gather(x, out, h, [4], -1)
        assert torch.equal(out, x)
        with pytest.raises(RuntimeError, match="dtype"):
            torch.ops.tp_numa.shm_all_reduce(torch.zeros(3, dtype=torch.int32), h)
        with pytest.raises(RuntimeError, match="contiguous"):
            torch.ops.tp_numa.shm_all_reduce(torch.zeros(4, 4).t(), h)
    finally:
        torch.ops.tp_numa.shm_destroy(h)


@needs_shm
def test_fast_path_matches_registered_op_names():
    from tp_numa.distributed import shm

    shm.load_extension()
    fast = shm._fast_functions()
    assert set(fast) == {"shm_all_reduce", "shm_broadcast"}
    with pytest.raises(TypeError):
        fast["shm_all_reduce"]("not a tensor", 0)


CASES = {
    "shm-np2": (2, {}, "shm"),
    "shm-np3": (3, {}, "shm"),
    "hierarchical-np4": (4, {"TP_NUMA_RANKS_PER_HOST": "2"}, "hierarchical"),
    "hosts-per-rank-np3": (3, {"TP_NUMA_SIMULATE_HOSTS": "1"}, "mpi"),
    "mpi-np3": (3, {"TP_NUMA_COMM": "mpi"}, "mpi"),
    "small-slots-np2": (2, {"TP_NUMA_SHM_SLOT_MB": "0.0625"}, "shm"),  # 64 KiB: many pieces
    "scalar-kernel-np3": (3, {"TP_NUMA_KERNEL": "scalar"}, "shm"),  # the reference sum
}


@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("case", list(CASES))
def test_collectives_against_oracle(case):
    np_, env, backend = CASES[case]
    if backend != "mpi" and not _shm_ops_built():
        pytest.skip("shm ops not built")
    r = run_mpi(np_, "collectives_check.py", "40", env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"OK {backend} 40" in r.stdout, r.stdout + r.stderr


@pytest.mark.mpi
@needs_mpi
@needs_shm
def test_segments_unlinked_and_private_under_mpirun():
    r = run_mpi(2, "segment_check.py", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SEGMENTS-OK 2") == 2, r.stdout + r.stderr
