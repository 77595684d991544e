"""Python wrappers and fake (meta) implementations of the mixture-of-experts ops (csrc/moe).

``moe_route(logits, bias, k, gating, norm, scale, n_groups, groups_used) -> (ids, weights)``
    logits float32 ``[T, E]`` (router output), bias float32 ``[E]`` or None (selection only)
    -> ids int64 ``[T, k]``, weights float32 ``[T, k]``:
    ``p = softmax(l)`` (gating 1) or ``sigmoid(l)`` (2) or ``l`` (3); ``s = p + bias``;
    with groups, only the ``groups_used`` groups of ``E / n_groups`` experts with the largest
    top-2 sums of ``s`` compete; ``ids = top-k(s)`` (ties: lower id), ``w = p[ids]``
    (gating 3: softmax of the k chosen logits); ``norm``: ``w / max(sum w, 2^-14)``;
    ``scale`` (not 0 or 1): ``w * scale``. llama.cpp's ``build_moe_ffn`` routing.

``moe_experts(x, ids, weights, mats, offsets, ff, qtypes, layouts, gelu) -> y``
    x float32 ``[T, d]`` -> float64 ``[T, d]``:
    ``y[t] = sum_j weights[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t]))``, ``e = ids[t, j]``,
    over this rank's slice of each expert (``ff[e]`` features: rows of gate/up, input
    columns of down). ``mats = [gate, up, down]`` are flat uint8 buffers; expert e's slice
    starts at byte ``offsets[m, e]``, as raw GGUF rows (``layouts[m] = 0``) or x4 groups (1).
    The float64 result is the rank's partial sum (down's Exact accumulation): all-reduce
    it, then round to float32 once (tp=N bitwise tp=1). T = 1 runs the k experts in one
    threaded pass; T > 1 groups the tokens by expert (one GEMM per expert).
"""
from __future__ import annotations

import torch

_OPS = ("moe_route", "moe_experts")


def available() -> bool:
    """True when the extension is built and registers these ops."""
    from ._ext import ops_registered

    return ops_registered(*_OPS)


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, k: int, gating: int, norm: bool, scale: float,
              n_groups: int = 1, groups_used: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids int64 [T, k], weights float32 [T, k])."""
    return torch.ops.tp_numa.moe_route(logits, bias, int(k), int(gating), bool(norm), float(scale), int(n_groups),
                                       int(groups_used))


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mats: list[torch.Tensor],
                offsets: torch.Tensor, ff: torch.Tensor, qtypes: list[int], layouts: list[int],
                gelu: bool) -> torch.Tensor:
    """This rank's weighted sum of the chosen experts' slices: x [T, d] -> float64 [T, d]."""
    return torch.ops.tp_numa.moe_experts(x, ids, weights, mats, offsets, ff, [int(q) for q in qtypes],
                                         [int(v) for v in layouts], bool(gelu))


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor can trace the ops."""
    if not available():
        return

    @torch.library.register_fake("tp_numa::moe_route")
    def _moe_route_fake(logits, bias, k, gating, norm, scale, n_groups, groups_used):
        torch._check(logits.dim() == 2, lambda: "moe_route: logits must be [T, E]")
        return (logits.new_empty((logits.shape[0], k), dtype=torch.int64),
                logits.new_empty((logits.shape[0], k), dtype=torch.float32))

    @torch.library.register_fake("tp_numa::moe_experts")
    def _moe_experts_fake(x, ids, weights, mats, offsets, ff, qtypes, layouts, gelu):
        torch._check(x.dim() == 2, lambda: "moe_experts: x must be [T, d]")
        return x.new_empty(x.shape, dtype=torch.float64)


_register_fakes()
