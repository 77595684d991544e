"""Python wrappers and fake (meta) implementations of the fused small row ops.

A decode step of a small model is dominated by per-op dispatch, not arithmetic: an eager
RMSNorm is 6 torch ops, a RoPE 10+, SiLU*mul 3. Each op here does the whole chain in one
native call over float32 rows (csrc/fused/):

- ``rms_norm(x, w, eps)``: x ``[..., d]`` -> ``x / sqrt(mean(x^2) + eps) * w``;
- ``add_rms_norm_(residual, x, w, eps, x_weight=None)``: ``residual += x`` in place,
  returns ``rms_norm(residual, w, eps)`` (the residual add and the next layer norm in one
  pass); with ``x_weight`` the added term is ``rms_norm(x, x_weight, eps)`` (Gemma's
  sandwich norms: post-norm of the block output, residual add, pre-norm of the next);
- ``rope_(x, cos, sin, neox)``: in-place RoPE of x ``[T, H, D]`` (a view of the fused qkv
  output is fine: heads and dims must be contiguous) with cos/sin ``[T, rd/2]`` as from
  ``RotaryEmbedding.cos_sin``; pairs ``(i, i + rd/2)`` if neox else ``(2i, 2i+1)``;
- ``act_mul(gu, gelu=False)``: gu ``[T, 2f]`` = ``[gate | up]`` -> ``act(gate) * up``
  ``[T, f]``, act = SiLU or GELU (tanh approximation).

Inputs must be contiguous float32 CPU tensors (except rope_'s row stride).
"""
from __future__ import annotations

import torch

_OPS = ("rms_norm", "add_rms_norm_", "rope_", "act_mul")


def available() -> bool:
    """True when the extension is built and registers these ops."""
    from ._ext import ops_registered

    return ops_registered(*_OPS)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.tp_numa.rms_norm(x, w, float(eps))


def add_rms_norm_(residual: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float,
                  x_weight: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.tp_numa.add_rms_norm_(residual, x, w, float(eps), x_weight)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    torch.ops.tp_numa.rope_(x, cos, sin, bool(neox))
    return x


def act_mul(gu: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    return torch.ops.tp_numa.act_mul(gu, bool(gelu))


def _register_fakes() -> None:
    if not available():
        return

    @torch.library.register_fake("tp_numa::rms_norm")
    def _rms_norm_fake(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("tp_numa::add_rms_norm_")
    def _add_rms_norm_fake(residual, x, w, eps, x_weight=None):
        return torch.empty_like(x)

    @torch.library.register_fake("tp_numa::rope_")
    def _rope_fake(x, cos, sin, neox):
        return None

    @torch.library.register_fake("tp_numa::act_mul")
    def _act_mul_fake(gu, gelu):
        return gu.new_empty((gu.shape[0], gu.shape[1] // 2))


_register_fakes()
