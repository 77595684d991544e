"""Serve a model over HTTP with the OpenAI API (docs/serve.md).

Every rank loads its shards and runs ``BatchEngine.run`` on its main thread (the
collectives live there); rank 0 also runs uvicorn in a background thread, parses requests
and samples. SIGINT / SIGTERM on rank 0 stop the HTTP server and end every rank with exit 0.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

from ..distributed import options, parallel_state
from ..errors import TpNumaError
from ..model_registry import DEFAULT_MODEL, known_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..offload import KV_CACHE_BYTES

    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"GGUF file path or a short name ({', '.join(known_names())}) (default: %(default)s)")
    g.add_argument("-t", "--threads", type=int, default=None, help="compute threads per rank")
    g.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context of each slot in tokens, prompt and reply together (KV memory = "
                        "parallel x ctx-size; default min(trained, 4096))")
    g.add_argument("--cache-type", default="f16", choices=tuple(KV_CACHE_BYTES), help="KV cache element type")
    g.add_argument("--offload", default=None, metavar="FILE|PRESET", help="placement config or preset")
    options.add_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    g.add_argument("--port", type=int, default=8080, help="TCP port (default: %(default)s)")
    g.add_argument("-np", "--parallel", type=int, default=4,
                   help="slots: requests decoded together in one batch (default: %(default)s)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 503 (default: %(default)s)")
    g.add_argument("--prefill-chunk", type=int, default=256,
                   help="tokens per step (prompt chunks beside the decode rows) (default: %(default)s)")
    g.add_argument("--alias", default=None, help="model name reported by /v1/models (default: the file name)")
    g.add_argument("-v", "--verbose", action="store_true", help="details of the load and HTTP access log")
    g.add_argument("-q", "--quiet", action="store_true", help="nothing on stderr but errors")


def _check_port(host: str, port: int) -> None:
    """Fail early, with one line, when the address cannot be bound."""
    if not 0 < port < 65536:
        raise TpNumaError(f"--port must be in 1..65535, got {port}")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise TpNumaError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def run(args) -> int:
    state = options.init_from_args(args)
    err = ""
    if state.is_main:
        try:
            _check_port(args.host, args.port)
            if args.parallel < 1:
                raise TpNumaError(f"--parallel must be >= 1, got {args.parallel}")
        except TpNumaError as e:
            err = str(e)
    parallel_state.check_all(not err, err)

    from ..engine import LLM
    from ..serve.engine import BatchEngine

    llm = LLM.load(args.model, threads=args.threads, max_context=args.ctx_size, offload=args.offload,
                   cache_type=args.cache_type, sequences=args.parallel, quiet=args.quiet,
                   verbose=args.verbose and not args.quiet)
    engine = BatchEngine(llm, n_slots=args.parallel, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    server = None
    if not state.is_main:
        # mpirun forwards a Ctrl-C to every rank: only rank 0 acts on it (it stops the HTTP
        # server and sends the other ranks their stop after the current step)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if state.is_main:
        import uvicorn

        from ..serve.app import make_app

        name = args.alias or llm.path.name
        app = make_app(engine, llm, name)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                                access_log=bool(args.verbose), lifespan="off")
        server = uvicorn.Server(config)

        def serve() -> None:
            try:
                server.run()
            finally:
                engine.shutdown()     # the HTTP side ended (stop or error): end the engine too

        def stop(signum, frame) -> None:
            server.should_exit = True
            engine.shutdown()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        # uvicorn must not install its own handlers from a non-main thread
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        threading.Thread(target=serve, name="uvicorn", daemon=True).start()
        if not args.quiet:
            print(f"tp-numa: serving {name} on http://{args.host}:{args.port} "
                  f"({args.parallel} slots x {engine.slot_context} positions)", file=sys.stderr, flush=True)
    engine.run()
    if server is not None:
        server.should_exit = True
    return 0
