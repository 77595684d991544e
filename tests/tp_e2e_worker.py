"""End-to-end tensor-parallel worker for tests/test_tp_e2e.py, run alone (world size 1) or
under ``mpirun -np N``; several models and prompts per launch (starting MPI + torch and
loading the weights cost more than a few tokens of these small models).

    [mpirun -np N] python tests/tp_e2e_worker.py --out OUT_DIR --tokens G --prompts 0,3 \
        --logits-len L SHORT=MODEL.gguf [SHORT=MODEL.gguf ...]

For each model (SHORT = golden short name, e.g. qwen2.5-coder-0.5b), every rank loads it
through the public API (``tp_numa.load(path, threads=1)``, i.e. the engine the CLI uses),
then rank 0 writes ``OUT_DIR/SHORT.json`` and ``OUT_DIR/SHORT.npy``:

- ``greedy``: {prompt index: token ids} of ``llm.stream(prompt, G, temperature=0)`` for the
  golden prompts ``load_golden(SHORT)['greedy'][i]['prompt']`` (the engine's greedy loop:
  rank 0 samples, ids are broadcast);
- ``texts``: {prompt index: the streamed text};
- ``margins``: {prompt index: top-1 minus top-2 logit at each generated step}, from one
  teacher-forced forward of prompt + continuation;
- ``weight_bytes``: [N] ``tp_numa.models.weight_bytes(llm.model)`` of each rank
  (registered parameters and buffers, KV cache excluded);
- ``storage_bytes``: [N] bytes of every distinct tensor *storage* reachable from the
  module tree of each rank (buffers, parameters and plain tensor attributes, KV cache
  excluded). Counting whole storages catches a shard that is a view into a bigger
  tensor (it keeps the whole tensor resident) and tensors kept outside buffers;
- ``anon_delta``: [N] growth of the rank's anonymous resident memory over the load (from
  /proc/self/smaps_rollup; information only: it includes the KV cache and allocator slack);
- ``SHORT.npy``: float32 [L, vocab] teacher-forced logits of the first L golden
  log-prob ids, one forward from position 0 with a float32 KV cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from golden import load_golden  # noqa: E402

import tp_numa  # noqa: E402
from tp_numa.distributed import communicator, parallel_state  # noqa: E402
from tp_numa.errors import TpNumaError  # noqa: E402
from tp_numa.models import weight_bytes  # noqa: E402

CACHE_NAMES = ("k_cache", "v_cache")


def anon_bytes() -> int:
    """Anonymous resident memory of this process (bytes)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages of every tensor held by the module tree (KV cache
    excluded): a module's parameters, buffers and tensor attributes (also inside lists,
    tuples and dicts)."""
    seen: dict[int, int] = {}

    def visit(name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            if name.endswith(CACHE_NAMES) or value.device.type == "meta":
                return
            st = value.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(name, v)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{name}.{k}", v)

    for mod in model.modules():
        for key, value in vars(mod).items():
            if key in ("_parameters", "_buffers"):
                for n, t in value.items():
                    visit(n, t)
            elif not key.startswith("_modules"):
                visit(key, value)
    return sum(seen.values())


def step_margins(llm, prompt: str, generated: list[int], state) -> list[float]:
    """Top-1 minus top-2 logit at each generated step, from one teacher-forced forward
    of prompt + continuation (rank 0; [] elsewhere). A small margin marks a near tie
    that a rounding difference may legitimately flip."""
    ids = llm.prompt_ids(prompt) + generated if state.is_main else None
    if state.world_size > 1:
        ids = communicator.broadcast_object(ids)
    n_prompt = len(ids) - len(generated) if state.is_main else 0
    logits = llm.model.forward(torch.tensor(ids, dtype=torch.long), 0)
    if not state.is_main:
        return []
    top2 = logits[n_prompt - 1: n_prompt - 1 + len(generated)].topk(2, dim=1).values
    return [float(m) for m in top2[:, 0] - top2[:, 1]]


def gather(state, value):
    """Every rank's ``value`` as a list on rank 0 (world size 1: [value])."""
    if state.world_size == 1:
        return [value]
    return parallel_state.mpi_comm().gather(value, root=0)


def run_model(short: str, path: str, args, state) -> None:
    golden = load_golden(short)
    before = anon_bytes()
    llm = tp_numa.load(path, threads=1, max_context=args.ctx, quiet=True)
    loaded = anon_bytes() - before
    sizes = gather(state, (weight_bytes(llm.model), storage_bytes(llm.model), loaded))

    greedy, texts, margins = {}, {}, {}
    for i in args.prompts:
        prompt = golden["greedy"][i]["prompt"]
        text = "".join(llm.stream(prompt, args.tokens, temperature=0.0))
        greedy[i] = list(llm.last_stats.token_ids)
        texts[i] = text
        margins[i] = step_margins(llm, prompt, greedy[i], state)

    ids = [int(t) for t in golden["logprobs"]["ids"][: args.logits_len]]
    llm.model.setup_cache(len(ids), "f32")
    logits = llm.model.forward(torch.tensor(ids, dtype=torch.long), 0)
    if state.is_main:
        np.save(os.path.join(args.out, f"{short}.npy"), logits.float().numpy())
        doc = {"world_size": state.world_size, "greedy": greedy, "texts": texts, "margins": margins,
               "weight_bytes": [s[0] for s in sizes], "storage_bytes": [s[1] for s in sizes],
               "anon_delta": [s[2] for s in sizes]}
        with open(os.path.join(args.out, f"{short}.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="SHORT=PATH pairs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompts", default="0", type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--logits-len", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        state = parallel_state.init()
        for pair in args.models:
            short, path = pair.split("=", 1)
            run_model(short, path, args, state)
    except TpNumaError as e:
        parallel_state.fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
