"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * w`` over the last dim (replicated weight).

Gemma's ``(1 + w)`` convention needs no special case here: the GGUF converter already
stored ``1 + w`` in the file (llama.cpp multiplies by the stored weight directly).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelFormatError
from ..gguf_loader import GGUFFile
from .. import fused_ops
from . import fused_path


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim), persistent=False)

    def load_gguf(self, f: GGUFFile, name: str) -> None:
        w = f.read_float(name)
        if tuple(w.shape) != (self.dim,):
            raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(w.shape)}, expected [{self.dim}]")
        self.weight = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] float32 -> same shape (one native call for contiguous float32 CPU x)."""
        if fused_path.applies(x, self.weight):
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
