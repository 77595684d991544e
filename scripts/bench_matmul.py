#!/usr/bin/env python
"""Quantized matmul speed vs the machine's read bandwidth, measured in the same run.

1. Read bandwidth: the native STREAM-like read kernel (tp_numa.ops.read_bandwidth_probe)
   over a buffer much larger than the last-level cache (1 GiB by default), read as
   consecutive windows the size of the GEMV weight, one op call per window, in the read
   pattern (1-8 streams per thread, with or without software prefetch) that read that
   size fastest at that thread count in the first round.
2. GEMV (M = 1) per type and weight shape: GB/s of weight bytes streamed per call, and its
   ratio to (1). GEMV calls and probe windows alternate one to one for the cell's time, and
   each keeps its best: the same statistic under the same host load (a shared host's
   bandwidth drifts by up to 2x within minutes, so a probe seconds away is no reference).
   The weights cycle through enough copies to fill as many bytes as the probe buffer
   (>= 3x the LLC), so every call reads from DRAM as in decode.
   Weights and the probe's buffer both live in the engine's weight memory (2 MiB
   transparent huge pages, ``tp_numa.memory``; ``TP_NUMA_HUGEPAGES=0``: 4 KiB pages), so
   the ratio compares reads of the same kind of memory.
   The in-cache column runs the same GEMV on a weight that stays in L2/L3: the kernel's compute
   ceiling, which must exceed the bandwidth for the GEMV to be memory bound.
3. GEMM (M = 512, prefill): GFLOP/s (2*M*N*K / t), and the speed-up over M separate GEMV
   calls on the same weight.
Types named ``<T>x4`` (Q4_0x4, Q5_0x4, Q8_0x4, Q4_Kx4, Q6_Kx4) run the same weights
repacked into the x4 layout (``ops.pack_x4`` + ``ops.quant_matmul_x4``), which is what the
engine uses for those types; the bandwidth target is checked on them.

On a shared host a second core can be busy for seconds at a time; ``--rounds N`` repeats
the whole sweep N times, interleaved, and keeps the best GEMV and the best probe of each
cell over the rounds.

Usage: .venv/bin/python scripts/bench_matmul.py [--threads 1 2] [--types Q4_0 Q8_0 ...]
       [--shapes 4096x4096 11008x4096 151936x896] [--gemm-shape 4096x4096] [--min-time 0.3]
       [--rounds 1]
Prints a markdown table (the one in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from tp_numa import ops
from tp_numa.memory import empty_weight, to_weight_memory

HOT = ["Q4_0x4", "Q5_0x4", "Q8_0x4", "Q4_Kx4", "Q6_Kx4"]
ALL = ["Q4_0", "Q4_0x4", "Q4_1", "Q5_0", "Q5_0x4", "Q5_1", "Q8_0", "Q8_0x4", "IQ4_NL", "Q4_K", "Q4_Kx4", "Q5_K",
       "Q6_K", "Q6_Kx4", "IQ4_XS", "F16", "BF16", "F32"]


def parse_type(name: str) -> tuple[T, bool]:
    """'Q5_0x4' -> (Q5_0, packed); 'Q4_K' -> (Q4_K, row layout)."""
    packed = name.endswith("x4")
    return T[name[:-2] if packed else name], packed


def matmul_fn(qtype: T, packed: bool):
    """(prepare(raw rows) -> weight, call(x, weight) -> y) for the row or the x4 layout."""
    if not packed:
        return to_weight_memory, (lambda x, w: ops.quant_matmul(x, w, int(qtype)))
    return ((lambda w: (ops.pack_x4(w, int(qtype)), w.shape[0])),
            (lambda x, w: ops.quant_matmul_x4(x, w[0], int(qtype), w[1])))
TARGET = 0.85  # GEMV bandwidth ratio the hot types should reach


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1024, "M": 1024 ** 2}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KM")) * mult)
    except OSError:
        pass
    return best or 32 * 1024 ** 2


# Read patterns the probe tries (streams per thread, software prefetch bytes ahead): which
# is fastest depends on the machine. On the 2-core test machine 3 streams read fastest at
# 1 and 2 threads (and 2 streams ~20 % faster than 8 at 1 thread); the benchmark's
# ceiling is the best of them, never one fixed pattern.
PROBE_PATTERNS = [(1, 0), (2, 0), (2, 1024), (3, 0), (3, 1024), (4, 0), (8, 0)]


def probe_windows(buf: torch.Tensor, window: int) -> list[torch.Tensor]:
    """buf (a buffer in weight memory, much larger than the LLC) as consecutive windows of
    `window` bytes: the probe reads one window per op call."""
    window = max(4096, min(window, buf.numel()))
    return [buf[o:o + window] for o in range(0, buf.numel() - window + 1, window)]


def best_pattern(views: list[torch.Tensor], min_time: float) -> tuple[tuple[int, int], float]:
    """(pattern, GB/s) of PROBE_PATTERNS that reads the windows fastest (best window of
    min_time seconds of reads per pattern)."""
    best = ((1, 0), 0.0)
    for pat in PROBE_PATTERNS:
        ops.read_bandwidth_probe(views[-1], 1, *pat)  # warm-up, then views[0]: read a buffer ago
        t, spent, i = float("inf"), 0.0, 0
        while spent < min_time:
            dt = ops.read_bandwidth_probe(views[i % len(views)], 1, *pat)
            t, spent, i = min(t, dt), spent + dt, i + 1
        if views[0].numel() / t / 1e9 > best[1]:
            best = (pat, views[0].numel() / t / 1e9)
    return best


def pattern_label(pat: tuple[int, int]) -> str:
    streams, pf = pat
    return f"{streams} stream{'s' if streams > 1 else ''}" + (f", prefetch {pf} B" if pf else "")


def weight_bytes(qtype: T, n: int, k: int) -> int:
    """Bytes of an n x k weight of qtype (k rounded down to whole blocks)."""
    elems, nbytes = ops.block_info(int(qtype))
    return n * (k // elems) * nbytes


def random_weight(qtype: T, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Raw GGUF bytes [n, row_bytes] with finite scales (content does not affect speed)."""
    elems, nbytes = ops.block_info(int(qtype))
    if qtype in (T.F32, T.F16, T.BF16):
        w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
        dt = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qtype]
        return w.to(dt).view(torch.uint8).reshape(n, -1).contiguous()
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        rows = rng.standard_normal((min(n, 64), k), dtype=np.float32)
        blk = torch.from_numpy(np.ascontiguousarray(quantize(rows, qtype)).view(np.uint8).reshape(len(rows), -1))
        return blk.repeat((n + len(rows) - 1) // len(rows), 1)[:n].contiguous()
    raw = rng.integers(0, 256, size=(n, k // elems, nbytes), dtype=np.uint8)
    offsets = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,), T.IQ4_NL: (0,)}[qtype]
    for off in offsets:
        raw[:, :, off:off + 2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    return torch.from_numpy(raw.reshape(n, -1))


def dram_copies(weight_bytes: int, footprint: int) -> int:
    """Copies of a weight that GEMV calls cycle through so that each call reads from DRAM:
    enough to fill `footprint` bytes (the probe buffer, >= 3x the LLC; a footprint of a
    few LLCs is still partly served by a thrash-resistant L3, up to 1.15x at 2 threads)."""
    return max(1, -(-footprint // weight_bytes))


def warm_up(fn, n_items: int) -> int:
    """Calls fn(i) on the first few items (at most 3); returns how many. Timing then starts
    at the next item, so with n_items > 1 a timed call never reads data a warm-up call
    left in the LLC (three 9 MiB weights fit in a 32 MiB L3)."""
    warm = min(3, n_items)
    for i in range(warm):
        fn(i)
    return warm


def time_calls(fn, n_items: int, min_time: float) -> float:
    """Best seconds per call of fn(i), i cycling over n_items, after warm-up.

    The minimum, not the median: on a shared machine other processes only ever slow a
    call down, so the fastest call is the best estimate of the kernel's own speed (the
    read bandwidth is measured the same way).
    """
    i = warm_up(fn, n_items)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t0 = time.perf_counter()
        fn(i % n_items)
        times.append(time.perf_counter() - t0)
        i += 1
    return min(times)


def bench_gemv(qtype: T, packed: bool, n: int, k: int, footprint: int, min_time: float, rng,
               views: list[torch.Tensor], pattern: tuple[int, int]) -> tuple[float, float]:
    """(GEMV GB/s, probe GB/s): GEMV calls, their weights cycling through >= footprint bytes
    of copies, alternating one to one with probe reads of equally large windows in
    `pattern`, for min_time seconds; each the best of its reads. Alternating at the
    millisecond scale puts both under the same host load, which on a shared machine
    drifts by up to 2x within minutes."""
    prep, mm = matmul_fn(qtype, packed)
    w0 = random_weight(qtype, n, k, rng)
    copies = dram_copies(w0.numel(), footprint)
    ws = [prep(w0) for _ in range(copies)]
    x = torch.randn(1, k)
    warm = warm_up(lambda i: mm(x, ws[i]), copies)
    ops.read_bandwidth_probe(views[-1], 1, *pattern)
    t_mm, t_rd = float("inf"), float("inf")
    start, i = time.perf_counter(), 0
    while time.perf_counter() - start < min_time or i < 5:
        t0 = time.perf_counter()
        mm(x, ws[(warm + i) % copies])
        t_mm = min(t_mm, time.perf_counter() - t0)
        t_rd = min(t_rd, ops.read_bandwidth_probe(views[i % len(views)], 1, *pattern))
        i += 1
    return w0.numel() / t_mm / 1e9, views[0].numel() / t_rd / 1e9


def bench_in_cache(qtype: T, packed: bool, min_time: float, rng) -> float:
    """GB/s of a GEMV whose weight (512 x 2048: 0.3-1.1 MB) stays in L2/L3: the kernel's compute ceiling."""
    prep, mm = matmul_fn(qtype, packed)
    w = random_weight(qtype, 512, 2048, rng)
    wp = prep(w)
    x = torch.randn(1, 2048)
    return w.numel() / time_calls(lambda i: mm(x, wp), 1, min_time) / 1e9


def bench_gemm(qtype: T, packed: bool, n: int, k: int, m: int, min_time: float, rng) -> tuple[float, float]:
    """(GFLOP/s of one M-row call, speed-up over M single-row calls)."""
    prep, mm = matmul_fn(qtype, packed)
    w = prep(random_weight(qtype, n, k, rng))
    x = torch.randn(m, k)
    t_gemm = time_calls(lambda i: mm(x, w), 1, min_time)
    rows = [x[i:i + 1] for i in range(m)]
    t_loop = time_calls(lambda i: [mm(r, w) for r in rows], 1, min_time)
    return 2.0 * m * n * k / t_gemm / 1e9, t_loop / t_gemm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--types", nargs="+", default=ALL)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "151936x896"],
                    help="GEMV weight shapes NxK (N outputs, K inputs)")
    ap.add_argument("--gemm-shape", default="4096x4096")
    ap.add_argument("--gemm-m", type=int, default=512)
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    ap.add_argument("--bw-bytes", type=int, default=1 << 30,
                    help="bytes of the probe buffer; GEMV weights cycle through max(this, 3x LLC)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the sweep, interleaved, and keep each cell's best GEMV and best probe")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")

    rng = np.random.default_rng(0)
    llc = llc_bytes()
    footprint = max(3 * llc, args.bw_bytes)  # GEMV weights cycle through as many bytes as the probe reads
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    gn, gk = (int(v) for v in args.gemm_shape.split("x"))
    print(f"kernel ISA: {ops.kernel_isa()}   LLC: {llc / 2**20:.0f} MiB   torch {torch.__version__}")
    # The machine's bandwidth drifts (shared host): each GEMV cell alternates with probe
    # reads of its own weight size, in the pattern that read that size fastest (chosen once
    # per thread count and size, in the first round).
    probe_buf = empty_weight(args.bw_bytes).fill_(1)  # the weights' kind of memory, resident
    patterns: dict[tuple[int, int], tuple[tuple[int, int], float]] = {}  # (threads, bytes) -> (pattern, GB/s)
    best: dict[tuple[str, int], tuple] = {}  # (type, threads) -> (in-cache, [(gemv, probe)] per shape, gemm)
    for rnd in range(args.rounds):
        for name in args.types:
            qtype, packed = parse_type(name)
            for th in args.threads:
                torch.set_num_threads(th)
                incache = bench_in_cache(qtype, packed, args.min_time, rng)
                gemv = []
                for n, k in shapes:
                    if k % ops.block_info(int(qtype))[0]:
                        gemv.append(None)
                        continue
                    key = (th, weight_bytes(qtype, n, k))
                    views = probe_windows(probe_buf, key[1])
                    if key not in patterns:
                        patterns[key] = best_pattern(views, args.min_time / 2)
                    gemv.append(bench_gemv(qtype, packed, n, k, footprint, args.min_time, rng, views,
                                           patterns[key][0]))
                gemm = None if args.no_gemm else bench_gemm(qtype, packed, gn, gk, args.gemm_m, args.min_time, rng)
                if (name, th) in best:
                    b_in, b_gemv, b_gemm = best[(name, th)]
                    incache = max(incache, b_in)
                    gemv = [None if g is None else (max(g[0], bg[0]), max(g[1], bg[1])) for g, bg in zip(gemv, b_gemv)]
                    gemm = None if gemm is None else max(gemm, b_gemm)
                best[(name, th)] = (incache, gemv, gemm)
                print(f"bench_matmul: round {rnd + 1}/{args.rounds} {name} {th} thread(s) done",
                      file=sys.stderr, flush=True)
    results = [(name, th, *best[(name, th)]) for name in dict.fromkeys(args.types) for th in args.threads]
    print("Read-probe pattern per thread count and window (the GEMV weight's size), chosen as the fastest of "
          f"{len(PROBE_PATTERNS)} in the first round:")
    print()
    print("| threads | window MB | pattern | GB/s when chosen |")
    print("|---|---|---|---|")
    for (th, window), (pat, gbs) in sorted(patterns.items()):
        print(f"| {th} | {window / 1e6:.{1 if window >= 1e6 else 3}f} | {pattern_label(pat)} | {gbs:.1f} |")
    print()
    print("GEMV cells: weight GB/s (ratio to the probe read alongside it, best of each"
          + (f" over {args.rounds} rounds" if args.rounds > 1 else "") + ")")
    print()
    head = "| type | threads | in-cache GEMV GB/s | " + " | ".join(f"GEMV {n}x{k} GB/s (ratio)" for n, k in shapes)
    head += "" if args.no_gemm else f" | GEMM M={args.gemm_m} {gn}x{gk} GFLOP/s (x vs {args.gemm_m} GEMVs)"
    print(head + " |")
    print("|" + "---|" * head.count("|"))
    misses = []
    for name, th, incache, gemv, gemm in results:
        cells = [f"{incache:.1f}"]
        for (n, k), cell in zip(shapes, gemv):
            if cell is None:
                cells.append(f"n/a (K % {ops.block_info(int(parse_type(name)[0]))[0]})")
                continue
            gbs, probe = cell
            ratio = gbs / probe
            cells.append(f"{gbs:.1f} ({ratio:.2f})")
            if name in HOT and ratio < TARGET:
                misses.append(f"{name} {n}x{k} {th}t: {ratio:.2f}")
        if gemm is not None:
            cells.append(f"{gemm[0]:.1f} (x{gemm[1]:.1f})")
        print(f"| {name} | {th} | " + " | ".join(cells) + " |", flush=True)
    print()
    hot = [t for t in dict.fromkeys(args.types) if t in HOT]
    if hot:
        print(f"target GEMV >= {TARGET} x read bandwidth for {', '.join(hot)}: "
              + ("met everywhere" if not misses else "missed at " + "; ".join(misses)))


if __name__ == "__main__":
    main()
