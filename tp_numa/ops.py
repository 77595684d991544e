"""Python wrappers and fake (meta) implementations of the native quantized-matmul ops.

``quant_matmul(x, w, qtype) -> y``
    y ``[M, N]`` = x ``[M, K]`` @ W^T. x float32 or bfloat16, contiguous; w uint8
    ``[N, row_bytes]`` contiguous raw GGUF rows of W (row_bytes = K / block_elems *
    block_bytes, see ``block_info``); qtype the GGML type id (``gguf.GGMLQuantizationType``).
    y has x's dtype. Quantized types quantize each activation row to 8-bit blocks and use
    integer dot products (see docs/kernels.md for the error this adds).

Threads: ``torch.set_num_threads``. Kernel variant: ``kernel_isa()`` /
``set_kernel_isa("scalar" | "avx2" | "avx512" | "avx512vnni" | "auto")``, or the
environment variable ``TP_NUMA_KERNEL`` read when the extension loads.
"""
from __future__ import annotations

import torch

from ._ext import load_extension
from .errors import UnsupportedError

# GGML type id -> (name, elements per block, bytes per block); must agree with
# csrc/quant/kernels.h (tests check both against gguf.constants.GGML_QUANT_SIZES).
_BLOCKS: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    20: ("IQ4_NL", 32, 18),
    23: ("IQ4_XS", 256, 136),
    30: ("BF16", 1, 2),
}

SUPPORTED_QTYPES: tuple[int, ...] = tuple(_BLOCKS)


def is_supported(qtype: int) -> bool:
    """True when quant_matmul has kernels for this GGML type id."""
    return int(qtype) in _BLOCKS


def block_info(qtype: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a supported GGML type id.

    Raises UnsupportedError naming the type for ids the kernels do not handle.
    """
    try:
        _, elems, nbytes = _BLOCKS[int(qtype)]
    except KeyError:
        raise UnsupportedError(f"GGML tensor type {_type_name(qtype)} has no tp_numa matmul kernel "
                               f"(supported: {', '.join(n for n, _, _ in _BLOCKS.values())})") from None
    return elems, nbytes


def type_name(qtype: int) -> str:
    """Name of a GGML type id ('Q4_K'), or 'type <id>' when unknown."""
    return _type_name(qtype)


def _type_name(qtype: int) -> str:
    if int(qtype) in _BLOCKS:
        return _BLOCKS[int(qtype)][0]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(int(qtype)).name
    except (ImportError, ValueError):
        return f"type {int(qtype)}"


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one GGUF row of k elements; UnsupportedError if k is not whole blocks."""
    elems, nbytes = block_info(qtype)
    if k % elems:
        raise UnsupportedError(f"{k} elements is not a whole number of {_type_name(qtype)} "
                               f"blocks ({elems} elements each)")
    return k // elems * nbytes


def quant_matmul(x: torch.Tensor, w: torch.Tensor, qtype: int) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] with W as raw GGUF bytes w [N, row_bytes] of type qtype."""
    return torch.ops.tp_numa.quant_matmul(x, w, int(qtype))


def quant_matmul_exact(x: torch.Tensor, w: torch.Tensor, qtype: int, to_float32: bool = False) -> torch.Tensor:
    """Like ``quant_matmul`` but float64 [M, N] and independent of how K is split.

    ``y[m, n] = sum_b t(m, n, b)`` summed in float64 in block order, where ``t`` is the
    kernel's fp32 product of one weight block with one activation block. So for block
    ranges ``K = K_0 + K_1 + ...`` the float64 sum of the ranges' results rounds to the same
    float32 as the whole product: what makes tensor parallel row splits reproduce tp=1.
    ``to_float32``: return that float32 rounding directly (nothing left to sum).
    """
    return torch.ops.tp_numa.quant_matmul_exact(x, w, int(qtype), bool(to_float32))


def dequantize(w: torch.Tensor, qtype: int) -> torch.Tensor:
    """Raw GGUF rows uint8 ``[N, row_bytes]`` -> float32 ``[N, K]``, bitwise what
    ``gguf.quants.dequantize`` gives, in native code (no numpy round trip): for the few
    rows a token embedding lookup needs, and for the GPU offload path's one-time expansion."""
    return torch.ops.tp_numa.dequantize(w, int(qtype))


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., K]`` (K a multiple of 32) -> uint8 ``[..., K / 32 * 34]`` GGUF Q8_0
    blocks, as ggml's ``quantize_row_q8_0`` makes them (bitwise ``gguf.quants.quantize``):
    the storage of a ``q8_0`` KV cache."""
    return torch.ops.tp_numa.quantize_q8_0(x)


# GGML types with an x4 layout (csrc/quant/packed_x4.h): Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K.
X4_QTYPES: tuple[int, ...] = (2, 6, 8, 12, 13, 14)


def pack_x4(w: torch.Tensor, qtype: int) -> torch.Tensor:
    """Raw GGUF rows uint8 ``[N, row_bytes]`` -> the x4 layout ``[ceil(N/4), 4 * row_bytes]``.

    Four rows interleaved block by block (same bytes per weight; a last group of N % 4 rows
    is padded with zero blocks): the decode GEMV then reads each group as one stream (three
    groups side by side per thread), shares each activation load among 4 rows and needs no
    horizontal sums. Types: ``X4_QTYPES``.
    """
    return torch.ops.tp_numa.pack_x4(w, int(qtype))


def unpack_x4(wp: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    """The raw GGUF rows ``[n, row_bytes]`` of an x4-packed weight of n rows."""
    return torch.ops.tp_numa.unpack_x4(wp, int(qtype), int(n))


def quant_matmul_x4(x: torch.Tensor, wp: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    """``quant_matmul`` on an x4-packed weight of n rows: x [M, K] -> [M, n]."""
    return torch.ops.tp_numa.quant_matmul_x4(x, wp, int(qtype), int(n))


def quant_matmul_x4_exact(x: torch.Tensor, wp: torch.Tensor, qtype: int, n: int,
                          to_float32: bool = False) -> torch.Tensor:
    """``quant_matmul_exact`` on an x4-packed weight of n rows (float64 [M, n])."""
    return torch.ops.tp_numa.quant_matmul_x4_exact(x, wp, int(qtype), int(n), bool(to_float32))


def kernel_isa() -> str:
    """The kernel variant in use: 'avx512vnni', 'avx512', 'avx2' or 'scalar'."""
    return torch.ops.tp_numa.kernel_isa()


def set_kernel_isa(isa: str) -> None:
    """Force a kernel variant ('scalar', 'avx2', 'avx512', 'avx512vnni') or 'auto'.

    RuntimeError if the CPU or the build lacks it.
    """
    torch.ops.tp_numa.set_kernel_isa(str(isa))


KERNEL_ISAS: tuple[str, ...] = ("scalar", "avx2", "avx512", "avx512vnni")


def available_kernel_isas() -> list[str]:
    """The kernel variants of ``KERNEL_ISAS`` that this CPU and build can run.

    Asks ``set_kernel_isa`` for each (the dispatcher's own test) and then restores the
    variant in use, so it briefly switches the process-wide choice: call it at setup, not
    beside running matmuls.
    """
    current = kernel_isa()
    found = []
    try:
        for isa in KERNEL_ISAS:
            try:
                set_kernel_isa(isa)
            except RuntimeError:
                continue
            found.append(isa)
    finally:
        set_kernel_isa(current)
    return found


def read_bandwidth_probe(buf: torch.Tensor, repeats: int, streams: int = 8, prefetch_bytes: int = 0) -> float:
    """Seconds taken to read every byte of buf `repeats` times (threads: torch.set_num_threads).

    A STREAM-like read kernel used by scripts/bench_matmul.py as the bandwidth ceiling. Each
    thread reads its share as ``streams`` (1, 2, 3, 4 or 8) interleaved sequential streams, with
    a software prefetch ``prefetch_bytes`` ahead of each (0: none).
    """
    return torch.ops.tp_numa.read_bandwidth_probe(buf, int(repeats), int(streams), int(prefetch_bytes))


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor can trace the ops."""

    @torch.library.register_fake("tp_numa::quant_matmul")
    def _quant_matmul_fake(x, w, qtype):
        torch._check(x.dim() == 2 and w.dim() == 2, lambda: "quant_matmul: x and w must be 2-D")
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("tp_numa::quant_matmul_exact")
    def _quant_matmul_exact_fake(x, w, qtype, to_float32=False):
        torch._check(x.dim() == 2 and w.dim() == 2, lambda: "quant_matmul_exact: x and w must be 2-D")
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32 if to_float32 else torch.float64)

    @torch.library.register_fake("tp_numa::dequantize")
    def _dequantize_fake(w, qtype):
        torch._check(int(qtype) in _BLOCKS, lambda: f"dequantize: unsupported type id {qtype}")
        _, elems, nbytes = _BLOCKS[int(qtype)]
        return w.new_empty((w.shape[0], w.shape[1] // nbytes * elems), dtype=torch.float32)

    @torch.library.register_fake("tp_numa::quantize_q8_0")
    def _quantize_q8_0_fake(x):
        return x.new_empty(tuple(x.shape[:-1]) + (x.shape[-1] // 32 * 34,), dtype=torch.uint8)

    @torch.library.register_fake("tp_numa::pack_x4")
    def _pack_x4_fake(w, qtype):
        return w.new_empty(((w.shape[0] + 3) // 4, 4 * w.shape[1]))

    @torch.library.register_fake("tp_numa::unpack_x4")
    def _unpack_x4_fake(wp, qtype, n):
        return wp.new_empty((n, wp.shape[1] // 4))

    @torch.library.register_fake("tp_numa::quant_matmul_x4")
    def _quant_matmul_x4_fake(x, wp, qtype, n):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("tp_numa::quant_matmul_x4_exact")
    def _quant_matmul_x4_exact_fake(x, wp, qtype, n, to_float32=False):
        return x.new_empty((x.shape[0], n), dtype=torch.float32 if to_float32 else torch.float64)


load_extension()
_register_fakes()
