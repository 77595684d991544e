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
    "serve": "serve a model over HTTP with the OpenAI API (continuous batching)",
    "bench": "llama-bench compatible throughput benchmark",
    "topo": "show NUMA nodes, cores, memory and the recommended mpirun line",
    "plan": "show where each module would be placed (CPU ranks / CUDA) without loading weights",
}


def version_lines() -> list[str]:
    """What `tp-numa --version` prints: the versions a bug report needs, one per line."""
    from . import __version__
    from ._ext import load_extension

    lines = [f"tp_numa {__version__}"]
    try:
        load_extension()
    except TpNumaError:
        lines.append("kernels: not available (native extension not built; run `bash scripts/setup.sh`)")
    else:
        import torch

        ops = torch.ops.tp_numa
        in_use = ops.kernel_isa()
        lines.append(f"kernels: {in_use}")
        # TP_NUMA_KERNEL can force a lesser variant: ask what "auto" picks on this CPU (and
        # this build), then restore the variant in use.
        ops.set_kernel_isa("auto")
        best = ops.kernel_isa()
        ops.set_kernel_isa(in_use)
        if best != in_use:
            lines.append(f"cpu best: {best}")
    import torch

    lines.append(f"torch {torch.__version__}")
    try:
        import mpi4py

        # Get_library_version may be called before MPI_Init: no MPI start-up for --version.
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
        from mpi4py import MPI

        # Open MPI's string ends in a NUL (the C buffer's terminator), kept by mpi4py.
        text = MPI.Get_library_version().split("\x00", 1)[0].strip()
        mpi = text.splitlines()[0].strip() if text else "not available"
    except Exception as e:  # not installed, or its MPI library does not load: say why
        mpi = f"not available ({type(e).__name__}: {e})".splitlines()[0]
    lines.append(f"MPI: {mpi}")
    return lines


class _VersionAction(argparse.Action):
    """Like argparse's "version" action, but the text is computed only when asked for
    (loading the extension and MPI costs a second or two that no other command should pay)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print("\n".join(version_lines()), flush=True)
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tp-numa",
        description="Tensor-parallel LLM inference on multi-socket CPUs (one MPI rank per NUMA node).",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of tp_numa, its kernels, torch and MPI, and exit")
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
