"""`tp-numa` command line: `tp-numa <command> ...`.

Each command lives in ``tp_numa/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``. User errors (``TpNumaError``) become one line on stderr and a
non-zero exit on every rank, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import TpNumaError

COMMANDS = {
    "generate": "generate text from a prompt",
    "bench": "llama-bench compatible throughput benchmark",
    "topo": "show NUMA nodes, cores, memory and the recommended mpirun line",
    "plan": "show where each module would be placed (CPU ranks / CUDA) without loading weights",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tp-numa",
        description="Tensor-parallel LLM inference on multi-socket CPUs (one MPI rank per NUMA node).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"tp_numa.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args._module.run(args)
    except TpNumaError as e:
        from .distributed import parallel_state

        parallel_state.fail(str(e))  # prints once, ends every rank, does not return
        return 1
    except KeyboardInterrupt:
        print("tp-numa: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
