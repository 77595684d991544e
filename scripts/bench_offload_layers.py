"""Decode ms/token at several KV depths with every layer on the CPU vs the last N decoder
layers placed whole on a device (weights dequantized once to fp16 there).

    python scripts/bench_offload_layers.py --model qwen2.5-coder-0.5b --layers 24 --depths 0,4096,16384
    python scripts/bench_offload_layers.py --device cpu --layers 4 --depths 0,256 --gen 8   # CPU stand-in

One process (world size 1, so no all-reduce round trips). Same protocol as
scripts/bench_offload.py (random tokens fill the KV cache to ``depth``, untimed; then
``--gen`` single-token forwards, the first untimed). Prints a markdown table for
docs/offload.md and the device memory the layers took.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_offload import ms_per_token  # noqa: E402
from tp_numa import model_registry, offload  # noqa: E402
from tp_numa.distributed.parallel_state import ParallelState  # noqa: E402
from tp_numa.models import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="GGUF path or short name")
    ap.add_argument("--layers", type=int, default=None, help="how many last layers to place (default: all)")
    ap.add_argument("--depths", default="0,4096,16384", help="comma-separated KV depths")
    ap.add_argument("--gen", type=int, default=32, help="decode steps per depth (first one untimed)")
    ap.add_argument("--device", default="cuda:0", help="where the layers run (cuda:N, or cpu)")
    ap.add_argument("--cache-type", default="f16", choices=("f16", "bf16", "f32"))
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk when filling the depth")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        print(f"bench_offload_layers: {args.device} requested but CUDA is not available; use --device cpu "
              "to run the code path on the CPU", file=sys.stderr)
        return 1
    path = model_registry.resolve(args.model)
    model, cfg = load_model(str(path), ParallelState())
    n = cfg.n_layers if args.layers is None else max(1, min(args.layers, cfg.n_layers))
    results, used = {}, 0   # (offloaded?, depth) -> ms/token
    for offloaded in (False, True):
        if offloaded:
            before = torch.cuda.memory_allocated(args.device) if on_cuda else 0
            offload.offload_layers(model, {i: args.device for i in range(cfg.n_layers - n, cfg.n_layers)})
            used = (torch.cuda.memory_allocated(args.device) - before) if on_cuda else 0
        where = f"last {n} layers on {args.device}" if offloaded else "all on CPU"
        for d in depths:
            results[offloaded, d] = ms_per_token(model, cfg.vocab_size, d, args.gen, args.cache_type, args.chunk, d + 1)
            print(f"{where}, depth {d}: {results[offloaded, d]:.2f} ms/token", file=sys.stderr, flush=True)
    dev_name = torch.cuda.get_device_name(torch.device(args.device)) if on_cuda else "CPU stand-in"
    print(f"{path.name}, {torch.get_num_threads()} CPU threads, KV cache {args.cache_type}, last {n} of "
          f"{cfg.n_layers} layers on {args.device} ({dev_name})"
          + (f", fp16 weights {used / 2**20:.1f} MiB" if on_cuda else "") + "\n")
    print(f"| depth | all on CPU (ms/token) | {n} layers on {args.device} (ms/token) | speed-up |")
    print("|---:|---:|---:|---:|")
    for d in depths:
        cpu, dev = results[False, d], results[True, d]
        print(f"| {d} | {cpu:.2f} | {dev:.2f} | {cpu / dev:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
