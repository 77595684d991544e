"""Linear methods: how a linear layer stores its weight and computes ``x @ W^T``.

The layer (linear.py) decides *which* slice of a GGUF weight a rank holds; the method
decides *how* that slice is kept and multiplied (vLLM's ``LinearMethodBase`` split).
GGUF weights stay in their block format: a ``[N, K]`` weight is ``uint8 [N, row_bytes]``
raw rows, and the native op ``tp_numa.ops.quant_matmul`` multiplies on the blocks
(F32/F16/BF16 rows go through the same op).

Q4_0, Q5_0, Q8_0, Q4_K, Q5_K and Q6_K weights of the decoder layers and of the LM head (a tied
head through its embedding, ``VocabParallelEmbedding.repack_x4``) are repacked once at load
time into the x4 layout (``tp_numa.ops.pack_x4``: four rows interleaved block by block, same
bytes): their GEMV is compute-bound in the row layout and runs 1.2-1.7x faster packed
(in cache; Q5_K, added last, 1.23x). ``TP_NUMA_X4=0`` keeps the raw rows (for A/B benchmarks).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .. import ops


class LinearMethodBase:
    """Creates a layer's weight storage and applies it."""

    def create_weights(self, layer: nn.Module, name: str, rows: torch.Tensor, qtype: int) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_exact(self, layer: nn.Module, name: str, x: torch.Tensor, to_float32: bool = False) -> torch.Tensor:
        """``x @ W^T`` as float64 partial sums whose value does not depend on how the input
        columns are split (see ``tp_numa.ops.quant_matmul_exact``); ``to_float32``: their
        float32 rounding (when there is nothing to all-reduce)."""
        raise NotImplementedError

    def raw_rows(self, layer: nn.Module, name: str) -> torch.Tensor:
        """The weight as raw GGUF rows uint8 ``[N, row_bytes]`` (for dequantization)."""
        raise NotImplementedError


class GGUFLinearMethod(LinearMethodBase):
    """Raw GGUF rows as a uint8 buffer; ``y[M, N] = quant_matmul(x[M, K], rows, qtype)``."""

    def create_weights(self, layer: nn.Module, name: str, rows: torch.Tensor, qtype: int) -> None:
        """rows: uint8 [N, row_bytes] (this rank's slice, already a fresh contiguous copy)."""
        assert rows.dtype == torch.uint8 and rows.dim() == 2 and rows.is_contiguous()
        layer.register_buffer(name, rows, persistent=False)
        setattr(layer, name + "_qtype", int(qtype))
        setattr(layer, name + "_method", self)

    def raw_rows(self, layer: nn.Module, name: str) -> torch.Tensor:
        return getattr(layer, name)

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        w = getattr(layer, name)
        return ops.quant_matmul(x.contiguous(), w, getattr(layer, name + "_qtype"))

    def apply_exact(self, layer: nn.Module, name: str, x: torch.Tensor, to_float32: bool = False) -> torch.Tensor:
        return ops.quant_matmul_exact(x.contiguous(), getattr(layer, name), getattr(layer, name + "_qtype"),
                                      to_float32)


class X4LinearMethod(LinearMethodBase):
    """Q4_0/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K rows repacked once into the x4 layout (``ops.pack_x4``):
    ``y[M, N] = quant_matmul_x4(x[M, K], packed, qtype, N)``."""

    def create_weights(self, layer: nn.Module, name: str, rows: torch.Tensor, qtype: int) -> None:
        """rows: uint8 [N, row_bytes]; kept as uint8 [ceil(N/4), 4 * row_bytes] (rows freed)."""
        assert rows.dtype == torch.uint8 and rows.dim() == 2 and rows.is_contiguous()
        self.use_packed(layer, name, ops.pack_x4(rows, int(qtype)), qtype, int(rows.shape[0]))

    def use_packed(self, layer: nn.Module, name: str, packed: torch.Tensor, qtype: int, n_rows: int) -> None:
        """Register an already packed weight of n_rows rows (e.g. shared with an embedding)."""
        layer.register_buffer(name, packed, persistent=False)
        setattr(layer, name + "_qtype", int(qtype))
        setattr(layer, name + "_rows", int(n_rows))
        setattr(layer, name + "_method", self)

    def raw_rows(self, layer: nn.Module, name: str) -> torch.Tensor:
        return ops.unpack_x4(getattr(layer, name), getattr(layer, name + "_qtype"), getattr(layer, name + "_rows"))

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        return ops.quant_matmul_x4(x.contiguous(), getattr(layer, name), getattr(layer, name + "_qtype"),
                                   getattr(layer, name + "_rows"))

    def apply_exact(self, layer: nn.Module, name: str, x: torch.Tensor, to_float32: bool = False) -> torch.Tensor:
        return ops.quant_matmul_x4_exact(x.contiguous(), getattr(layer, name), getattr(layer, name + "_qtype"),
                                         getattr(layer, name + "_rows"), to_float32)


def x4_enabled() -> bool:
    """Whether packable weights are repacked at load (env ``TP_NUMA_X4``, default on)."""
    return os.environ.get("TP_NUMA_X4", "1") != "0"


def x4_pays(qtype: int) -> bool:
    """Whether a weight of this type is repacked into the x4 layout: every type that has
    one (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K), unless ``TP_NUMA_X4=0``. (Q8_0 rows of 1 KiB or
    more stayed in the row layout until the x4 GEMV read 3 streams per thread; since then
    x4 is faster at every width: 1.30-1.49x at 1 thread, 1.07-1.49x at 2, for 4096x4096,
    11008x4096 and 4864x896, docs/kernels.md.)"""
    return int(qtype) in ops.X4_QTYPES and x4_enabled()


def linear_method_for(qtype: int, repack: bool = False) -> LinearMethodBase:
    """The method for a GGUF tensor type (every supported type runs on its blocks).

    ``repack``: the caller owns the rows alone (not shared with an embedding), so a weight
    whose type has an x4 layout may be repacked (``x4_pays``)."""
    if repack and x4_pays(qtype):
        return _X4_METHOD
    return _GGUF_METHOD


def shared_x4_weight(layer: nn.Module, name: str, packed: torch.Tensor, qtype: int, n_rows: int) -> None:
    """Give ``layer.<name>`` an x4-packed weight owned by another module (tied LM head)."""
    _X4_METHOD.use_packed(layer, name, packed, qtype, n_rows)


def method_of(layer: nn.Module, name: str) -> LinearMethodBase:
    """The method that created ``layer.<name>``."""
    return getattr(layer, name + "_method")


_GGUF_METHOD = GGUFLinearMethod()
_X4_METHOD = X4LinearMethod()
