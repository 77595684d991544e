"""Cost of exact (float64, split-invariant) row-parallel sums, end to end at world size 1.

    .venv/bin/python scripts/bench_exact_rowparallel.py --model qwen2.5-coder-0.5b --threads 1

Loads the model once and alternates two settings of every RowParallelLinear (attn_output,
ffn_down): ``exact=True`` (the default: quant_matmul_exact, float64 partials, what makes
tp=N bitwise tp=1) and ``exact=False`` (fp32 partials from quant_matmul). Each repeat runs
a 512-token prefill and 32 decode steps per setting, interleaved; prints medians.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="GGUF path or short name")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed")
    args = ap.parse_args(argv)

    from tp_numa.layers.linear import RowParallelLinear
    from tp_numa.model_registry import resolve
    from tp_numa.models import load_model

    torch.set_num_threads(args.threads)
    model, cfg = load_model(str(resolve(args.model)))
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    prompt = torch.arange(args.prompt) % 1000 + 100

    def run(exact: bool) -> tuple[float, float]:
        for m in rows:
            m.exact = exact
        model.setup_cache(args.prompt + args.decode + 1, torch.float16)
        t = time.perf_counter()
        model(prompt, 0, last_only=True)
        pp = time.perf_counter() - t
        tok = torch.tensor([5])
        t = time.perf_counter()
        for i in range(args.decode):
            model(tok, args.prompt + i, last_only=True)
        return pp, (time.perf_counter() - t) / args.decode

    res = {True: [], False: []}
    for r in range(args.repeats):
        for exact in (False, True):
            res[exact].append(run(exact))
            print(f"repeat {r + 1}/{args.repeats} exact={exact}: pp {res[exact][-1][0]:.2f} s", file=sys.stderr)
    med = {e: np.median(np.array(v), axis=0) for e, v in res.items()}
    print(f"{args.model}, {args.threads} thread(s), medians of {args.repeats}:")
    for exact in (False, True):
        pp, tg = med[exact]
        print(f"  {'exact (default)' if exact else 'fp32 partials  '}  pp{args.prompt} {pp * 1e3:8.0f} ms"
              f"   tg {tg * 1e3:6.2f} ms/token")
    print(f"  exact / fp32: pp x{med[True][0] / med[False][0]:.3f}, tg x{med[True][1] / med[False][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
