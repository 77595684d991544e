"""Decode ms/token at several KV depths, all on the CPU vs offloaded to a device.

    python scripts/bench_offload.py --model gemma3-270m --depths 0,4096,16384 --gen 32
    python scripts/bench_offload.py --model qwen2.5-coder-0.5b --layers 24 --depths 0,4096,16384
    python scripts/bench_offload.py --device cpu --depths 0,256 --gen 8            # CPU stand-in

One process (world size 1, so no all-reduce round trips). What moves to ``--device``
(default cuda:0): every attention core with its KV cache (``DeviceAttention``), or with
``--layers N`` the last N decoder layers whole (``DeviceDecoderLayer``: weights
dequantized once to fp16 there). For each depth the KV cache is filled with ``depth``
random tokens (prefill in chunks, not timed), then ``--gen`` single-token forwards run,
the first untimed; ms/token is the mean of the rest. The same model runs twice: first all
on the CPU, then offloaded. Prints a markdown table for docs/offload.md (and, for layers
on CUDA, the device memory they took).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tp_numa import model_registry, offload  # noqa: E402
from tp_numa.distributed.parallel_state import ParallelState  # noqa: E402
from tp_numa.layers.attention import Attention  # noqa: E402
from tp_numa.models import load_model  # noqa: E402


def ms_per_token(model, vocab: int, depth: int, gen: int, cache: str, chunk: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    model.setup_cache(depth + gen + 1, cache)
    with torch.inference_mode():
        prompt = torch.randint(0, vocab, (depth,), generator=g)
        for s in range(0, depth, chunk):
            model(prompt[s:s + chunk], s)
        toks = torch.randint(0, vocab, (gen,), generator=g)
        model(toks[:1], depth)  # warm-up step (first touch of buffers, CUDA kernels)
        t0 = time.perf_counter()
        for i in range(1, gen):
            model(toks[i:i + 1], depth + i)
        return (time.perf_counter() - t0) * 1e3 / max(gen - 1, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="GGUF path or short name")
    ap.add_argument("--layers", type=int, default=None,
                    help="offload the last N decoder layers whole (default: only the attention cores)")
    ap.add_argument("--depths", default="0,4096,16384", help="comma-separated KV depths")
    ap.add_argument("--gen", type=int, default=32, help="decode steps per depth (first one untimed)")
    ap.add_argument("--device", default="cuda:0", help="where the offloaded part runs (cuda:N, or cpu)")
    ap.add_argument("--cache-type", default="f16", choices=("f16", "bf16", "f32"))
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk when filling the depth")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        print(f"bench_offload: {args.device} requested but CUDA is not available; use --device cpu "
              "to run the offload path on the CPU", file=sys.stderr)
        return 1
    path = model_registry.resolve(args.model)
    model, cfg = load_model(str(path), ParallelState())
    n = None if args.layers is None else max(1, min(args.layers, cfg.n_layers))
    what = "attention" if n is None else f"last {n} of {cfg.n_layers} layers"
    results, used = {}, 0   # (offloaded?, depth) -> ms/token; device bytes of the layers
    for offloaded in (False, True):
        if offloaded:
            before = torch.cuda.memory_allocated(args.device) if on_cuda else 0
            if n is None:
                offload.offload_attention(model, {name: args.device for name, m in model.named_modules()
                                                  if isinstance(m, Attention)})
            else:
                offload.offload_layers(model, {i: args.device for i in range(cfg.n_layers - n, cfg.n_layers)})
            used = (torch.cuda.memory_allocated(args.device) - before) if on_cuda else 0
        where = f"{what} on {args.device}" if offloaded else "all on CPU"
        for d in depths:
            results[offloaded, d] = ms_per_token(model, cfg.vocab_size, d, args.gen, args.cache_type, args.chunk, d + 1)
            print(f"{where}, depth {d}: {results[offloaded, d]:.2f} ms/token", file=sys.stderr, flush=True)
    dev_name = torch.cuda.get_device_name(torch.device(args.device)) if on_cuda else "CPU stand-in"
    print(f"{path.name}, {torch.get_num_threads()} CPU threads, KV cache {args.cache_type}, {what} on "
          f"{args.device} ({dev_name})" + (f", device memory {used / 2**20:.1f} MiB" if on_cuda else "") + "\n")
    print(f"| depth | all on CPU (ms/token) | {what} on {args.device} (ms/token) | speed-up |")
    print("|---:|---:|---:|---:|")
    for d in depths:
        cpu, dev = results[False, d], results[True, d]
        print(f"| {d} | {cpu:.2f} | {dev:.2f} | {cpu / dev:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
