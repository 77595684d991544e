#!/usr/bin/env python3
"""Native attention kernels alone: decode time against context length, prefill throughput.

    .venv/bin/python scripts/bench_attention.py -t 1 --ctx 128,1024,4096

For the shipped models' per-rank geometry at tp=1 (Qwen2.5-0.5B: 24 layers of 14 query /
2 KV heads x 64; Gemma-3-270m: 3 global layers of 4 / 1 x 256, the 15 local layers see at
most 512 keys) it prints the decode op's time per layer and per token (all layers of that
kind), the KV bytes read per second, and the prefill op's GFLOP/s for a 512-token prompt.
Times are the best of --rounds; with one thread the CPU time of the thread is used (less
disturbed by other processes on a shared machine), with more threads wall time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {  # name -> (H, n_kv, D, layers that read the whole context)
    "qwen2.5-0.5b": (14, 2, 64, 24),
    "gemma3-270m-global": (4, 1, 256, 3),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--ctx", default="128,512,1024,2048,4096", help="comma list of context lengths")
    ap.add_argument("--cache-type", default="f16", choices=("f16", "bf16", "f32", "q8_0"),
                    help="KV cache storage (q8_0: GGUF Q8_0 blocks, read by the ops directly)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20, help="calls per round")
    args = ap.parse_args()

    import torch

    from tp_numa import attention_ops
    from tp_numa.layers.attention import kv_cache_dtype, to_cache

    if not attention_ops.available():
        raise SystemExit("native attention ops are not built (scripts/build_ext.sh)")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    dt = kv_cache_dtype(args.cache_type)
    ctxs = [int(c) for c in args.ctx.split(",")]
    print(f"threads {args.threads}, KV cache {args.cache_type}, "
          f"{'thread CPU time' if args.threads == 1 else 'wall time'}, best of {args.rounds} x {args.reps}\n")
    print("| geometry | N_KV | decode us/layer | decode ms/token (layers) | KV read GB/s |")
    print("|---|---:|---:|---:|---:|")
    for name, (H, n_kv, D, layers) in MODELS.items():
        for n in ctxs:
            q = torch.randn(H, D)
            k = to_cache(torch.randn(n, n_kv, D), dt)
            v = to_cache(torch.randn(n, n_kv, D), dt)
            for _ in range(3):
                attention_ops.attn_decode(q, k, v, n, 0.125)
            best = float("inf")
            for _ in range(args.rounds):
                c0 = clock()
                for _ in range(args.reps):
                    attention_ops.attn_decode(q, k, v, n, 0.125)
                best = min(best, (clock() - c0) / args.reps)
            kv_bytes = 2 * k.numel() * k.element_size()
            print(f"| {name} | {n} | {best * 1e6:.1f} | {best * layers * 1e3:.3f} ({layers}) | "
                  f"{kv_bytes / best / 1e9:.1f} |")
    print("\n| geometry | prompt | prefill ms/layer | GFLOP/s |")
    print("|---|---:|---:|---:|")
    T = 512
    for name, (H, n_kv, D, _) in MODELS.items():
        q = torch.randn(T, H, D)
        k = to_cache(torch.randn(T, n_kv, D), dt)
        v = to_cache(torch.randn(T, n_kv, D), dt)
        attention_ops.attn_prefill(q, k, v, T, 0, 0.125, -1)
        best = float("inf")
        for _ in range(max(1, args.rounds // 2)):
            c0 = clock()
            attention_ops.attn_prefill(q, k, v, T, 0, 0.125, -1)
            best = min(best, clock() - c0)
        flops = 4 * H * D * T * (T + 1) / 2  # q.k and p.v over the causal triangle
        print(f"| {name} | {T} | {best * 1e3:.1f} | {flops / best / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
