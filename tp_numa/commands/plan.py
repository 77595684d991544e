"""Show where each module of a model would be placed (CPU ranks / CUDA GPUs), per rank,
with the bytes every rank would hold on every device, without loading any weight.

Examples:
  tp-numa plan --model qwen2.5-coder-0.5b --offload attention-on-gpu --tp 2
  tp-numa plan --model model.gguf --offload my-placement.toml --ctx-size 16384 --gpus 1
"""
from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import TpNumaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..offload import KV_CACHE_BYTES   # torch-free: the --cache-type names

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("-m", "--model", required=True,
                        help="GGUF file or short model name (e.g. qwen2.5-coder-0.5b, gemma3-270m)")
    parser.add_argument("--offload", default="all-cpu", metavar="FILE|PRESET",
                        help="placement config (TOML) or preset: all-cpu (default), attention-on-gpu, layers-on-gpu, experts-on-cpu")
    parser.add_argument("--tp", type=int, default=None,
                        help="number of tensor-parallel ranks to plan for (default: the MPI world size, 1 without mpirun)")
    parser.add_argument("-c", "--ctx-size", type=int, default=None,
                        help="context length the KV cache is sized for (default: min(trained context, 4096), as generate)")
    parser.add_argument("--cache-type", default="f16", choices=tuple(KV_CACHE_BYTES),
                        help="KV cache element type (default f16)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="CUDA GPUs per host to plan for (default: the GPUs visible here); "
                             "lets a CPU-only machine plan for a GPU host")
    parser.add_argument("--ranks-per-host", type=int, default=None,
                        help="ranks on each host, for the rank -> GPU mapping (default: all ranks on one host)")


def run(args: argparse.Namespace) -> int:
    from .. import model_registry, offload
    from ..distributed import parallel_state

    state = parallel_state.init()
    tp = args.tp if args.tp is not None else state.world_size
    if tp < 1:
        raise TpNumaError(f"--tp must be >= 1, got {tp}")
    if args.gpus is not None and args.gpus < 0:
        raise TpNumaError(f"--gpus must be >= 0, got {args.gpus}")
    per_host = args.ranks_per_host or tp
    if per_host < 1:
        raise TpNumaError(f"--ranks-per-host must be >= 1, got {per_host}")
    if args.ctx_size is not None and args.ctx_size < 1:
        raise TpNumaError(f"--ctx-size must be >= 1, got {args.ctx_size}")
    placement = offload.load_placement(args.offload, check=False)
    if args.gpus is None and placement.uses_gpu and offload.cuda_device_count() == 0:
        raise TpNumaError(f"{placement.source} places modules on a CUDA GPU, but none is visible here; "
                          "pass --gpus N to plan for a host with N GPUs")
    path = model_registry.resolve(args.model, quiet=not state.is_main)
    with warnings.catch_warnings():
        # the plan lists unmatched rules itself, as "warning:" lines
        warnings.simplefilter("ignore", offload.PlacementWarning)
        plan = offload.plan_for_file(path, placement, tp, max_seq_len=args.ctx_size, kv_type=args.cache_type,
                                     n_gpus=args.gpus, local_ranks=[r % per_host for r in range(tp)])
    if state.is_main:
        print(offload.format_plan(plan))
        sys.stdout.flush()
    return 0
