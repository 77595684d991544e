#!/usr/bin/env python3
"""tp-numa against llama.cpp on the same GGUF and thread count: interleaved, repeated.

    bash scripts/setup_reference.sh       # once: builds the llama.cpp reference
    .venv/bin/python scripts/compare_llamacpp.py -m qwen2.5-coder-0.5b -r 3

For every configuration (``t1``: 1 thread, ``t2``: 2 threads, ``tp2x1``: ``mpirun -np 2``
with 1 thread per rank, compared with llama.cpp at 2 threads) it starts one tp-numa worker
and one llama.cpp worker that keep their model loaded, then for every test (pp512, tg128,
tg128 @ d4096 by default) alternates the two, one repetition each, ``-r`` times, so slow
drifts of a shared machine hit both alike. It prints mean t/s ± stddev of each and the
ratio tp-numa / llama.cpp, plus tp2x1 / t2 of tp-numa (the cost of communication).

llama.cpp runs through llama-cpp-python (``Llama.eval``: prompt in batches of 512, then
one token per eval, random token ids as llama-bench uses), or, with ``--llama-bench [BIN]``,
through a llama-bench binary (one llama-bench call per test, alternating with tp-numa per
test rather than per repetition). Depths are filled once per worker and test (untimed).
Both come from the reference build of scripts/setup_reference.sh by default (found by
scripts/reference_paths.py); ``--lcpp-python PY`` (env LCPP_PYTHON) and ``--llama-bench
BIN`` override it.

Progress on stderr; the result table on stdout; ``--json FILE`` keeps every sample.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

import reference_paths

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROTO = "@@"  # prefix of worker reply lines (anything else on a worker's stdout is ignored)


def log(msg: str) -> None:
    print(f"compare: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tests


def parse_test(text: str) -> tuple[str, int, int]:
    """'pp512' -> ('pp', 512, 0); 'tg128@d4096' -> ('tg', 128, 4096)."""
    name, _, depth = text.replace(" ", "").partition("@")
    kind, n = name[:2], int(name[2:])
    if kind not in ("pp", "tg") or n <= 0:
        raise SystemExit(f"compare: bad test {text!r} (use ppN, tgN, ppN@dD, tgN@dD)")
    return kind, n, int(depth[1:]) if depth else 0


def test_label(kind: str, n: int, depth: int) -> str:
    return f"{kind}{n}" + (f" @ d{depth}" if depth else "")


# ---------------------------------------------------------------- workers (child side)


def _serve(handle) -> None:
    """Worker loop: one JSON command per stdin line, one reply line per command."""
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        secs = handle(cmd)
        print(PROTO + json.dumps({"secs": secs}), flush=True)


def worker_lcpp(args) -> None:
    """llama.cpp through llama-cpp-python (run with the interpreter that has llama_cpp)."""
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_ctx=args.ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
                n_threads_batch=args.threads, logits_all=False, verbose=False)
    rng = random.Random(args.seed)
    vocab = llm.n_vocab()
    state = {"depth": -1}

    def toks(n):
        return [rng.randrange(vocab) for _ in range(n)]

    def handle(cmd):
        kind, n, depth = cmd["kind"], cmd["n"], cmd["depth"]
        if state["depth"] != depth:
            llm.reset()
            if depth:
                llm.eval(toks(depth))
            state["depth"] = depth
        llm.n_tokens = depth  # eval() first drops every cached position >= n_tokens
        t0 = time.perf_counter()
        if kind == "pp":
            llm.eval(toks(n))
        else:
            for t in toks(n):
                llm.eval([t])
        return time.perf_counter() - t0

    print(PROTO + json.dumps({"ready": True}), flush=True)
    _serve(handle)


def worker_tpnuma(args) -> None:
    """tp-numa (under mpirun: every rank runs this; rank 0 talks to the parent)."""
    sys.path.insert(0, REPO)
    from tp_numa.commands.bench import RandomTokenRunner
    from tp_numa.distributed import communicator, parallel_state
    from tp_numa.engine import LLM

    state = parallel_state.init()
    llm = LLM.load(args.model, threads=args.threads, max_context=args.ctx, quiet=True)
    runner = RandomTokenRunner(llm, args.seed, 512)
    filled = {"depth": -1}

    def handle(cmd):
        kind, n, depth = cmd["kind"], cmd["n"], cmd["depth"]
        if filled["depth"] != depth:
            if depth:
                runner.prefill(depth, 0)
            filled["depth"] = depth
        return runner.prefill(n, depth) if kind == "pp" else runner.decode(n, depth)

    if state.world_size == 1:
        print(PROTO + json.dumps({"ready": True}), flush=True)
        _serve(handle)
        return
    # rank 0 reads the commands and broadcasts them; all ranks run them
    lines = iter(sys.stdin) if state.is_main else None
    if state.is_main:
        print(PROTO + json.dumps({"ready": True}), flush=True)
    while True:
        cmd = json.loads(next(lines)) if state.is_main else None
        cmd = communicator.broadcast_object(cmd, src=0)
        if cmd["op"] == "quit":
            break
        secs = handle(cmd)
        if state.is_main:
            print(PROTO + json.dumps({"secs": secs}), flush=True)


# ---------------------------------------------------------------- workers (parent side)


class Worker:
    """A child process that loads a model once and times tests on request."""

    def __init__(self, argv: list[str], name: str, env: dict | None = None):
        self.name = name
        log(f"starting {name}: {' '.join(argv)}")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     bufsize=1)
        self._reply()

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTO):
                return json.loads(line[len(PROTO):])
        raise SystemExit(f"compare: worker {self.name} exited (code {self.proc.wait()}); see its stderr above")

    def run(self, kind: str, n: int, depth: int) -> float:
        self.proc.stdin.write(json.dumps({"op": "run", "kind": kind, "n": n, "depth": depth}) + "\n")
        self.proc.stdin.flush()
        return self._reply()["secs"]

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=120)


class LlamaBenchBinary:
    """llama.cpp through a llama-bench binary: one call per test, -r repetitions inside."""

    def __init__(self, binary: str, model: str, threads: int):
        self.binary, self.model, self.threads = binary, model, threads

    def run_all(self, kind: str, n: int, depth: int, reps: int) -> list[float]:
        argv = [self.binary, "-m", self.model, "-t", str(self.threads), "-r", str(reps), "-o", "json",
                "-p", str(n if kind == "pp" else 0), "-n", str(n if kind == "tg" else 0), "-d", str(depth)]
        log("running " + " ".join(argv))
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        rec = json.loads(out)[0]
        return [1e-9 * ns for ns in rec["samples_ns"]]


def tpnuma_argv(args, ranks: int, threads: int, ctx: int) -> list[str]:
    me = [sys.executable, os.path.abspath(__file__), "--worker", "tpnuma", "-m", args.model,
          "--threads", str(threads), "--ctx", str(ctx), "--seed", str(args.seed)]
    if ranks == 1:
        return me
    mpirun = args.mpirun or shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(ranks)] + me


def lcpp_argv(args, threads: int, ctx: int) -> list[str]:
    return [args.lcpp_python, os.path.abspath(__file__), "--worker", "lcpp", "-m", args.model,
            "--threads", str(threads), "--ctx", str(ctx), "--seed", str(args.seed)]


CONFIGS = {  # name -> (tp-numa ranks, threads per rank, llama.cpp threads)
    "t1": (1, 1, 1),
    "t2": (1, 2, 2),
    "tp2x1": (2, 1, 2),
}


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b", help="GGUF path or tp-numa short name")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--tests", default="pp512,tg128,tg128@d4096", help="comma list of ppN / tgN [@dD]")
    ap.add_argument("--configs", default="t1,t2,tp2x1", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--lcpp-python", default=os.environ.get("LCPP_PYTHON"),
                    help="python that can import llama_cpp (env LCPP_PYTHON; default: the venv of "
                         "scripts/setup_reference.sh)")
    ap.add_argument("--llama-bench", nargs="?", const="reference", default=None, metavar="BIN",
                    help="time llama.cpp with a llama-bench binary instead (no BIN: the reference build's)")
    ap.add_argument("--mpirun", default=None, help="mpirun for tp2x1 (default: next to python, or on PATH)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None, metavar="FILE", help="write every sample here")
    ap.add_argument("--worker", choices=("tpnuma", "lcpp"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ctx", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "lcpp":
        worker_lcpp(args)
        return 0
    if args.worker == "tpnuma":
        worker_tpnuma(args)
        return 0

    # the reference build (scripts/setup_reference.sh) unless overridden; fail before any model load
    if args.llama_bench == "reference":
        args.llama_bench = reference_paths.binary("llama-bench")
    elif args.llama_bench is None and args.lcpp_python is None:
        args.lcpp_python = reference_paths.python()
    log("llama.cpp: " + (args.llama_bench or args.lcpp_python))

    sys.path.insert(0, REPO)
    from tp_numa import model_registry

    args.model = str(model_registry.resolve(args.model))
    tests = [parse_test(t) for t in args.tests.split(",") if t.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"compare: unknown config {c!r} (choose from {', '.join(CONFIGS)})")
    ctx = max(n + d for _, n, d in tests) + 16
    results = []  # dicts: config, test, tpnuma [s], llamacpp [s], tokens
    for cname in configs:
        ranks, threads, lthreads = CONFIGS[cname]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        tpn = Worker(tpnuma_argv(args, ranks, threads, ctx), f"tp-numa {cname}", env)
        lc = None if args.llama_bench else Worker(lcpp_argv(args, lthreads, ctx), f"llama.cpp t{lthreads}")
        binary = LlamaBenchBinary(args.llama_bench, args.model, lthreads) if args.llama_bench else None
        try:
            for kind, n, depth in tests:
                label = test_label(kind, n, depth)
                a, b = [], []
                # warm-up (and depth fill) of both, untimed
                tpn.run(kind, min(n, 32), depth)
                if lc:
                    lc.run(kind, min(n, 32), depth)
                for rep in range(args.repetitions):
                    if lc:
                        b.append(lc.run(kind, n, depth))
                    a.append(tpn.run(kind, n, depth))
                    log(f"{cname} {label} rep {rep + 1}/{args.repetitions}: tp-numa {n / a[-1]:.2f} t/s"
                        + (f", llama.cpp {n / b[-1]:.2f} t/s" if lc else ""))
                if binary:
                    b = binary.run_all(kind, n, depth, args.repetitions)
                results.append({"config": cname, "test": label, "tokens": n, "tpnuma_s": a, "llamacpp_s": b})
        finally:
            tpn.close()
            if lc:
                lc.close()

    name = os.path.basename(args.model)
    print(f"\n{name}: tp-numa vs llama.cpp, {args.repetitions} interleaved repetitions, t/s mean ± stddev\n")
    print("| config | test | tp-numa t/s | llama.cpp t/s | ratio |")
    print("|---|---|---:|---:|---:|")
    by_key = {}
    for r in results:
        ta, sa = mean_std([r["tokens"] / s for s in r["tpnuma_s"]])
        tb, sb = mean_std([r["tokens"] / s for s in r["llamacpp_s"]])
        r.update(tpnuma_ts=ta, llamacpp_ts=tb, ratio=ta / tb if tb else None)
        by_key[(r["config"], r["test"])] = ta
        print(f"| {r['config']} | {r['test']} | {ta:.2f} ± {sa:.2f} | {tb:.2f} ± {sb:.2f} | {ta / tb:.2f}x |")
    for r in results:
        if r["config"] == "tp2x1" and ("t2", r["test"]) in by_key:
            print(f"\ntp-numa tp2x1 / t2, {r['test']}: {by_key[('tp2x1', r['test'])] / by_key[('t2', r['test'])]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
