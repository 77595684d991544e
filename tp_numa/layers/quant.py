"""Linear methods: how a linear layer stores its weight and computes ``x @ W^T``.

The layer (linear.py) decides *which* slice of a GGUF weight a rank holds; the method
decides *how* that slice is kept and multiplied (vLLM's ``LinearMethodBase`` split).
GGUF weights stay in their block format: a ``[N, K]`` weight is ``uint8 [N, row_bytes]``
raw rows, and the native op ``tp_numa.ops.quant_matmul`` multiplies on the blocks
(F32/F16/BF16 rows go through the same op).
"""
from __future__ import annotations

import torch
from torch import nn


class LinearMethodBase:
    """Creates a layer's weight storage and applies it."""

    def create_weights(self, layer: nn.Module, name: str, rows: torch.Tensor, qtype: int) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_exact(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` as float64 partial sums whose value does not depend on how the input
        columns are split (see ``tp_numa.ops.quant_matmul_exact``)."""
        raise NotImplementedError


class GGUFLinearMethod(LinearMethodBase):
    """Raw GGUF rows as a uint8 buffer; ``y[M, N] = quant_matmul(x[M, K], rows, qtype)``."""

    def create_weights(self, layer: nn.Module, name: str, rows: torch.Tensor, qtype: int) -> None:
        """rows: uint8 [N, row_bytes] (this rank's slice, already a fresh contiguous copy)."""
        assert rows.dtype == torch.uint8 and rows.dim() == 2 and rows.is_contiguous()
        layer.register_buffer(name, rows, persistent=False)
        setattr(layer, name + "_qtype", int(qtype))

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        from .. import ops

        w = getattr(layer, name)
        return ops.quant_matmul(x.contiguous(), w, getattr(layer, name + "_qtype"))

    def apply_exact(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        from .. import ops

        return ops.quant_matmul_exact(x.contiguous(), getattr(layer, name), getattr(layer, name + "_qtype"))


def linear_method_for(qtype: int) -> LinearMethodBase:
    """The method for a GGUF tensor type (every supported type runs on its blocks)."""
    return _GGUF_METHOD


_GGUF_METHOD = GGUFLinearMethod()
