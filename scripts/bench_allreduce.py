"""All-reduce latency: the shared-memory op against mpi4py ``Allreduce`` (in place).

    mpirun -np 2 python scripts/bench_allreduce.py [--iters 2000] [--sizes 4K,16K,64K,1M]

Both paths run in the same job on the same fp32 buffers. Each iteration is timed on every
rank (back to back, no barrier between iterations, as in a decode loop); an iteration's
latency is the slowest rank's time. Prints median and p99 per size and path, and the
MPI/shm ratios (> 1: shm is faster). ``--path op`` times the native entry point alone instead of
``communicator.all_reduce`` (which adds the Python wrapper).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * mult)


def human(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB" if n >= 1 << 10 else f"{n} B"


def time_loop(fn, iters: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(iters, dtype=np.float64)
    clock = time.perf_counter_ns
    for i in range(iters):
        t0 = clock()
        fn()
        out[i] = clock() - t0
    return out / 1e3  # microseconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--sizes", default="4K,16K,64K,1M", help="bytes per rank, comma-separated (K/M suffixes)")
    ap.add_argument("--path", choices=["communicator", "op"], default="communicator")
    args = ap.parse_args()

    from mpi4py import MPI

    from tp_numa.distributed import communicator, parallel_state

    st = parallel_state.init()
    if st.world_size < 2 or st.n_hosts != 1:
        print("run under mpirun with >= 2 ranks on one host", file=sys.stderr)
        return 2
    comm = parallel_state.mpi_comm()
    communicator.all_reduce(torch.zeros(1))  # builds the shm group
    if communicator.backend_name() != "shm":
        print(f"shm op unavailable (backend {communicator.backend_name()})", file=sys.stderr)
        return 2
    group = communicator._get().shm
    rows = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        n = max(1, size // 4)
        # small iteration counts for big sizes keep the run short on a shared box
        iters = args.iters if size <= 64 << 10 else max(200, args.iters // 4)
        x = torch.randn(n)
        arr = x.numpy()
        if args.path == "op":
            # the native entry point alone (the builtin the communicator calls)
            from tp_numa.distributed import shm

            op, handle = shm._fast_functions().get("shm_all_reduce", torch.ops.tp_numa.shm_all_reduce.default), group.handle
            shm_fn = lambda: op(x, handle)  # noqa: E731
        else:
            shm_fn = lambda: communicator.all_reduce(x)  # noqa: E731
        mpi_fn = lambda: comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)  # noqa: E731
        comm.Barrier()
        t_shm = time_loop(shm_fn, iters, args.warmup)
        comm.Barrier()
        t_mpi = time_loop(mpi_fn, iters, args.warmup)
        # per iteration, the slowest rank
        t_shm = np.max(np.array(comm.allgather(t_shm)), axis=0)
        t_mpi = np.max(np.array(comm.allgather(t_mpi)), axis=0)
        rows.append((size, np.median(t_shm), np.percentile(t_shm, 99), np.median(t_mpi), np.percentile(t_mpi, 99)))
    if st.rank == 0:
        print(f"all-reduce fp32, {st.world_size} ranks, path={args.path}, iters={args.iters} "
              f"(times in us; ratio = mpi / shm)")
        print(f"{'size':>7} | {'shm med':>8} {'shm p99':>8} | {'mpi med':>8} {'mpi p99':>8} | {'ratio med':>9} {'ratio p99':>9}")
        for size, sm, sp, mm, mp in rows:
            print(f"{human(size):>7} | {sm:8.2f} {sp:8.2f} | {mm:8.2f} {mp:8.2f} | {mm / sm:9.2f} {mp / sp:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
