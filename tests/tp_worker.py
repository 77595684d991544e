"""Runs one model under ``mpirun -np N`` (or alone, N = 1) for the tensor-parallel tests.

    mpirun -np N python tests/tp_worker.py MODEL.gguf OUT.npz [MODEL2.gguf OUT2.npz ...] \
        --tokens 1,2,3 --greedy 8

(several models per launch: starting MPI and torch costs more than these tiny models.)
For each model, rank 0 writes its OUT.npz with
- ``logits``: float32 [T, vocab] of the prompt (one prefill from position 0);
- ``greedy``: int64 [G] greedy continuation (prefill, then one token per step; rank 0
  picks the argmax and broadcasts the id, as the engine does);
- ``step_logits``: float32 [G, vocab] logits of each decode step;
- ``weight_bytes``: int64 [N] bytes of weights each rank holds;
- ``native_decode``: bool [N], whether each rank's decode steps ran the native
  ``DecodePlan`` (tp_numa.layers.native_decode; off with TP_NUMA_NATIVE_DECODE=0).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tp_numa.distributed import communicator, parallel_state  # noqa: E402
from tp_numa.errors import TpNumaError  # noqa: E402
from tp_numa.layers import native_decode  # noqa: E402
from tp_numa.models import load_model, weight_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs", nargs="+", help="MODEL.gguf OUT.npz pairs")
    ap.add_argument("--tokens", action="append", required=True,
                    help="comma-separated prompt ids; once for all models or once per model")
    ap.add_argument("--greedy", type=int, default=8)
    ap.add_argument("--cache", default="f32")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    state = parallel_state.init()
    pairs = list(zip(args.pairs[0::2], args.pairs[1::2]))
    prompts = args.tokens if len(args.tokens) == len(pairs) else args.tokens[:1] * len(pairs)
    for (model_path, out), prompt in zip(pairs, prompts):
        run_one(model_path, out, [int(t) for t in prompt.split(",")], args, state)


def run_one(model_path: str, out: str, prompt: list[int], args, state) -> None:
    try:
        model, cfg = load_model(model_path, state)
    except TpNumaError as e:
        parallel_state.fail(str(e))
    tokens = torch.tensor(prompt)
    model.setup_cache(len(tokens) + args.greedy + 1, args.cache)
    logits = model(tokens, 0)
    greedy, steps = [], []
    nxt = torch.zeros(1, dtype=torch.long)
    if state.is_main:
        nxt[0] = int(logits[-1].argmax())
    communicator.broadcast(nxt, 0)
    for i in range(args.greedy):
        greedy.append(int(nxt[0]))
        step = model(nxt.clone(), len(tokens) + i)
        if state.is_main:
            steps.append(step[0].numpy())
            nxt[0] = int(step[0].argmax())
        communicator.broadcast(nxt, 0)
    sizes = communicator.all_gather(torch.tensor([weight_bytes(model)], dtype=torch.int64), dim=0)
    native = communicator.all_gather(
        torch.tensor([native_decode.plan_for(model.model) is not None], dtype=torch.int64), dim=0)
    if state.is_main:
        np.savez(out, logits=logits.numpy(), greedy=np.array(greedy, dtype=np.int64),
                 step_logits=np.stack(steps), weight_bytes=sizes.numpy(), native_decode=native.numpy() != 0)


if __name__ == "__main__":
    main()
