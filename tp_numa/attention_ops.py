"""Python wrappers and fake (meta) implementations of the native attention ops.

``attn_decode(q, k_cache, v_cache, n_keys, scale)``
    q float32 ``[H, D]``; k/v ``[S, n_kv, D]`` (float16, bfloat16 or float32, contiguous),
    attends to slots ``0..n_keys-1`` (all visible: the caller passes only keys this query
    may see, in any order). Returns float32 ``[H * D]``. Flash-decoding: the keys are split
    into chunks over all threads, each chunk keeps (max, sum, partial output) per query
    head, and the chunks are merged with the log-sum-exp rule.

``attn_decode_update(q, k_new, v_new, k_cache, v_cache, slot, n_keys, scale)``
    the same after writing k_new/v_new ``[n_kv, D]`` into cache slot ``slot``.

``attn_prefill(q, k, v, n_keys, q_offset, scale, window)``
    q float32 ``[T, H, D]``; k/v ``[L, n_kv, D]`` in position order, of which the first
    ``n_keys`` are used; query i sits at key index ``q_offset + i``. Key j is visible iff
    ``j <= q_offset + i`` and (``window < 0`` or ``q_offset + i - j < window``). Returns
    float32 ``[T, H * D]``. Blocked online softmax: memory is O(block) whatever T is.

Query head h reads KV head ``h // (H // n_kv)``. Threads: ``torch.set_num_threads``.
"""
from __future__ import annotations

import torch

_OPS = ("attn_decode", "attn_decode_update", "attn_prefill")


def available() -> bool:
    """True when the extension is built and registers these ops."""
    from ._ext import ops_registered

    return ops_registered(*_OPS)


def attn_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_keys: int,
                scale: float) -> torch.Tensor:
    """One query row per head against the cache: q [H, D] -> [H*D] (float32)."""
    return torch.ops.tp_numa.attn_decode(q, k_cache, v_cache, int(n_keys), float(scale))


def attn_decode_update(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot: int, n_keys: int, scale: float) -> torch.Tensor:
    """Writes k_new/v_new [n_kv, D] into cache slot ``slot`` (rounded to the cache dtype),
    then ``attn_decode`` over slots 0..n_keys-1: the decode step in one native call."""
    return torch.ops.tp_numa.attn_decode_update(q, k_new, v_new, k_cache, v_cache, int(slot), int(n_keys),
                                                float(scale))


def attn_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_keys: int, q_offset: int,
                 scale: float, window: int) -> torch.Tensor:
    """Causal (optionally windowed) attention of T queries: q [T, H, D] -> [T, H*D] (float32)."""
    return torch.ops.tp_numa.attn_prefill(q, k, v, int(n_keys), int(q_offset), float(scale), int(window))


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor can trace the ops."""
    if not available():
        return

    @torch.library.register_fake("tp_numa::attn_decode")
    def _decode_fake(q, k_cache, v_cache, n_keys, scale):
        return q.new_empty((q.shape[0] * q.shape[1],), dtype=torch.float32)

    @torch.library.register_fake("tp_numa::attn_decode_update")
    def _decode_update_fake(q, k_new, v_new, k_cache, v_cache, slot, n_keys, scale):
        return q.new_empty((q.shape[0] * q.shape[1],), dtype=torch.float32)

    @torch.library.register_fake("tp_numa::attn_prefill")
    def _prefill_fake(q, k, v, n_keys, q_offset, scale, window):
        return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=torch.float32)


_register_fakes()
