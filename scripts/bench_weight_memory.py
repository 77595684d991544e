#!/usr/bin/env python
"""GEMV speed with weights in weight memory (2 MiB huge pages) vs ordinary 4 KiB pages.

The same weight bytes are held twice: copied into ``tp_numa.memory.empty_weight`` storage
(what the loader does) and into torch's ordinary allocator (``clone``). Each round times
both (order alternating), each from DRAM (copies cycling through 1 GiB, as bench_matmul); the
result is the median over rounds of the paired ratio huge / ordinary, so host drift between
rounds cancels. Also prints how many bytes really landed on huge pages.

Usage: .venv/bin/python scripts/bench_weight_memory.py [--threads 1 2] [--types Q4_0x4 Q4_Kx4 Q8_0]
       [--shapes 11008x4096 151936x768] [--rounds 8]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_matmul as bm  # noqa: E402

from tp_numa import memory  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--types", nargs="+", default=["Q4_0x4", "Q4_Kx4", "Q8_0"])
    ap.add_argument("--shapes", nargs="+", default=["11008x4096", "151936x768"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--min-time", type=float, default=0.2)
    args = ap.parse_args()
    if os.environ.get("TP_NUMA_HUGEPAGES", "1") == "0":
        ap.error("TP_NUMA_HUGEPAGES=0 is set: weight memory would be ordinary memory, nothing to compare")
    print(f"transparent huge pages: {memory.thp_mode()}   kernel ISA: {bm.ops.kernel_isa()}")
    rng = np.random.default_rng(0)
    llc = bm.llc_bytes()
    print("| type | shape | threads | 4 KiB pages GB/s (median) | huge pages GB/s (median) | paired ratio median [min-max] |")
    print("|---|---|---|---|---|---|")
    for spec in args.shapes:
        n, k = (int(v) for v in spec.split("x"))
        for name in args.types:
            qtype, packed = bm.parse_type(name)
            if k % bm.ops.block_info(int(qtype))[0]:
                continue
            prep, mm = bm.matmul_fn(qtype, packed)
            w0 = bm.random_weight(qtype, n, k, rng)
            copies = bm.dram_copies(w0.numel(), max(3 * llc, 1 << 30))
            ref = prep(w0)
            unpack = (lambda w: w[0]) if packed else (lambda w: w)
            repack = (lambda t: (t, ref[1])) if packed else (lambda t: t)
            before = memory.huge_page_bytes()
            ws = {"huge": [repack(memory.to_weight_memory(unpack(ref))) for _ in range(copies)],
                  "4k": [repack(unpack(ref).clone()) for _ in range(copies)]}
            on_huge = (memory.huge_page_bytes() - before) / (copies * unpack(ref).numel())
            x = torch.randn(1, k)
            for th in args.threads:
                torch.set_num_threads(th)
                res = {"huge": [], "4k": []}
                for r in range(args.rounds):
                    for v in (("huge", "4k") if r % 2 == 0 else ("4k", "huge")):
                        t = bm.time_calls(lambda i: mm(x, ws[v][i]), copies, args.min_time)
                        res[v].append(w0.numel() / t / 1e9)
                ratio = np.array(res["huge"]) / np.array(res["4k"])
                print(f"| {name} | {spec} | {th} | {np.median(res['4k']):.1f} | {np.median(res['huge']):.1f} "
                      f"({on_huge:.0%} on huge pages) | {np.median(ratio):.2f} [{ratio.min():.2f}-{ratio.max():.2f}] |",
                      flush=True)
            del ws


if __name__ == "__main__":
    main()
