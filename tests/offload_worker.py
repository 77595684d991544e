"""Runs a model with every attention core offloaded (device "cpu" standing in for the
GPU) under ``mpirun -np N``, for tests/test_offload_model.py; with ``--layers 1,2`` those
decoder layers are offloaded whole (tests/test_offload_layers.py).

    mpirun -np N python tests/offload_worker.py MODEL.gguf OUT.npy --tokens 1,2,3 --chunks 6,1,1 [--layers 1,2]

Rank 0 writes the float32 logits [T, vocab] of all positions, fed in the given chunks.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tp_numa import offload  # noqa: E402
from tp_numa.distributed import parallel_state  # noqa: E402
from tp_numa.layers.attention import Attention  # noqa: E402
from tp_numa.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--chunks", required=True)
    ap.add_argument("--cache", default="f32")
    ap.add_argument("--layers", default="", help="decoder layers to offload whole")
    args = ap.parse_args()
    torch.set_num_threads(1)
    state = parallel_state.init()
    model, _ = load_model(args.model, state)
    whole = [int(i) for i in args.layers.split(",") if i]
    offload.offload_layers(model, {i: "cpu" for i in whole})
    names = [n for n, m in model.named_modules()
             if isinstance(m, Attention) and not any(n.startswith(f"model.layers.{i}.") for i in whole)]
    offload.offload_attention(model, {n: "cpu" for n in names})
    tokens = torch.tensor([int(t) for t in args.tokens.split(",")])
    model.setup_cache(len(tokens), args.cache)
    out, pos = [], 0
    with torch.no_grad():
        for c in (int(c) for c in args.chunks.split(",")):
            out.append(model(tokens[pos:pos + c], pos))
            pos += c
    if state.is_main:
        np.save(args.out, torch.cat(out).float().numpy())


if __name__ == "__main__":
    main()
