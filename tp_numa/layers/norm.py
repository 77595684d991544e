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
        """x [..., dim] float32 -> same shape (one native call for float32 CPU x).

        A strided x (the q or k heads of several tokens, views of the fused qkv output) is
        made contiguous first, so every row goes through the same native op whatever the
        number of rows: a token's result does not depend on its batch."""
        if fused_path.applies(self.weight) and x.dtype is torch.float32 and x.is_cpu:
            return fused_ops.rms_norm(x.contiguous(), self.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector split across the ranks by heads (OLMoE's q/k norm: one norm
    over all ``n_heads * head_dim`` values, each rank holding its heads' share).

        y_i = x_i / sqrt(sum_all x^2 / full_dim + eps) * w_i

    Each rank sums the squares of its ``owned`` values in float64, the sums are
    all-reduced (a [T] float64 vector), and the scale is rounded to float32 once, as
    llama.cpp's rms_norm does with its double sum. ``owned`` leaves out heads that another
    rank also holds (KV heads replicated when tp > n_kv_heads), so every value counts once.
    """

    def __init__(self, full_dim: int, local: tuple[int, int], eps: float, owned: tuple[int, int] | None = None,
                 tp_size: int = 1):
        super().__init__()
        self.full_dim, self.local, self.eps, self.tp_size = full_dim, tuple(local), eps, tp_size
        self.owned = tuple(owned) if owned is not None else (0, local[1] - local[0])   # within the local slice
        self.register_buffer("weight", torch.ones(local[1] - local[0]), persistent=False)

    def load_gguf(self, f: GGUFFile, name: str) -> None:
        info = f.info(name)
        if tuple(info.shape) != (self.full_dim,):
            raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(info.shape)}, expected [{self.full_dim}]")
        self.weight = f.read_float(name, *self.local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H_local, hd] (this rank's heads) -> same shape, float32."""
        T = x.shape[0]
        flat = x.reshape(T, -1)                                           # (T, local values)
        a, b = self.owned
        ss = flat[:, a:b].double().pow(2).sum(-1)                          # (T,) float64
        if self.tp_size > 1:
            from ..distributed import communicator

            communicator.all_reduce(ss)
        scale = (1.0 / torch.sqrt(ss / self.full_dim + self.eps)).float()  # (T,)
        return (flat * scale[:, None] * self.weight).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.full_dim} (local {self.local}), eps={self.eps}"
