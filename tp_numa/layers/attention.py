"""Causal self-attention over a per-rank KV cache (GQA, optional sliding window).

The layer receives q/k/v that are already projected, normed and RoPE'd for this rank's
heads, stores k/v in its cache, and returns softmax(q k^T * scale + mask) v.

Cache layout: ``k_cache``/``v_cache`` are ``[n_seqs, slots, n_kv_heads, head_dim]``: one
cache per KV sequence (a server slot; ``tp-numa generate`` uses sequence 0 alone), and
``k_cache[s]`` is sequence s's contiguous ``[slots, n_kv, head_dim]``. A full
attention layer has ``slots = max_seq_len`` and keeps position p in slot p. A sliding
window layer keeps only its window: ``slots = min(window, max_seq_len)`` and position p
lives in slot ``p % slots`` (a ring buffer). A query at position t sees key p iff
``p <= t`` and (no window or ``t - p < window``), so a window layer never needs a key
older than ``window - 1`` positions and the ring always holds every key it can see.

Numerics: keys/values are rounded to the cache dtype on the way in (fp16 by default,
as in llama.cpp; or Q8_0 blocks, ``q8_0``) and every attention read uses the rounded values, so a prompt run in
one prefill and the same prompt run token by token see identical keys. Scores, softmax
and the weighted sum are computed in float32.

Two implementations with one contract: the native ops ``tp_numa.attention_ops`` (decode:
flash-decoding over the cache; prefill: blocked online softmax) and a plain torch path
(``use_native=False``) that is the readable definition and the fallback for devices and
dtypes the native ops do not cover.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import attention_ops, memory
from ..errors import TpNumaError
from .batch import Positions, SeqBatch

# q8_0: GGUF Q8_0 blocks (fp16 scale + 32 int8 per 32 elements, 8.5 bits per value) stored
# as uint8 [slots, n_kv, head_dim / 32 * 34]; written by ops.quantize_q8_0 (ggml's
# quantize_row_q8_0), read by the native attention ops directly.
Q8_0_CACHE = torch.uint8
KV_CACHE_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "q8_0": Q8_0_CACHE}
_Q8_0 = 8  # GGML type id


def kv_cache_dtype(name: str | torch.dtype) -> torch.dtype:
    """Maps the user's ``--cache-type`` (f16 | bf16 | f32 | q8_0, or a torch dtype; uint8
    stands for q8_0) to the cache tensor's dtype."""
    if isinstance(name, torch.dtype):
        if name not in KV_CACHE_DTYPES.values():
            raise TpNumaError(f"KV cache dtype {name} is not supported (use f16, bf16, f32 or q8_0)")
        return name
    key = str(name).lower().replace("float", "f").replace("fp", "f")
    key = {"f": "f32", "half": "f16", "bfloat16": "bf16", "b16": "bf16", "q8": "q8_0"}.get(key, key)
    if key not in KV_CACHE_DTYPES:
        raise TpNumaError(f"KV cache type {name!r} is not supported (use f16, bf16, f32 or q8_0)")
    return KV_CACHE_DTYPES[key]


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """k or v [..., D] rounded to the cache's storage: a dtype cast, or Q8_0 blocks
    (uint8 [..., D / 32 * 34]) for a q8_0 cache."""
    if cache_dtype is Q8_0_CACHE:
        from .. import ops

        return ops.quantize_q8_0(x.float().contiguous())
    return x.to(cache_dtype)


def from_cache(c: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Cache rows [L, n_kv, row] as a float tensor [L, n_kv, head_dim] (Q8_0 dequantized;
    other dtypes returned as they are) for the torch reference path."""
    if c.dtype is not Q8_0_CACHE:
        return c
    from .. import ops

    L, n_kv, row = c.shape
    return ops.dequantize(c.reshape(L * n_kv, row).contiguous(), _Q8_0).view(L, n_kv, head_dim)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int,
                        k_pos0: int, scale: float, window: int | None) -> torch.Tensor:
    """Plain torch attention with explicit positions (the readable definition).

    q [T, H, D], k/v [L, n_kv, D] (any float dtype); query i is at position q_pos0 + i,
    key j at k_pos0 + j. Returns float32 [T, H*D].
    """
    T, H, D = q.shape
    L, n_kv, _ = k.shape
    group = H // n_kv
    qf = q.float().transpose(0, 1)                                    # (H, T, D)
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)    # (H, L, D)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)    # (H, L, D)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale            # (H, T, L)
    qpos = torch.arange(q_pos0, q_pos0 + T).unsqueeze(1)              # (T, 1)
    kpos = torch.arange(k_pos0, k_pos0 + L).unsqueeze(0)              # (1, L)
    visible = kpos <= qpos
    if window is not None:
        visible &= (qpos - kpos) < window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)                             # (H, T, L)
    out = torch.matmul(probs, vf)                                     # (H, T, D)
    return out.transpose(0, 1).reshape(T, H * D)


class Attention(nn.Module):
    """Attention for one layer on this rank: ``n_heads`` query heads, ``n_kv_heads`` KV heads.

    Query head h reads KV head ``h // (n_heads // n_kv_heads)`` (GQA). ``sliding_window``
    None means full causal attention.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None, layer_idx: int, use_native: bool | None = None):
        super().__init__()
        if n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
            raise TpNumaError(
                f"layer {layer_idx}: {n_heads} query heads are not a multiple of {n_kv_heads} KV heads")
        if sliding_window is not None and sliding_window <= 0:
            raise TpNumaError(f"layer {layer_idx}: sliding window must be positive, got {sliding_window}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.scale = float(scale)
        self.sliding_window = sliding_window
        self.layer_idx = layer_idx
        self.use_native = use_native
        self._native_ok: bool | None = None
        self.max_seq_len = 0
        self.slots = 0
        self.n_seqs = 0
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, heads={self.n_heads}, kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, window={self.sliding_window}, slots={self.slots}, seqs={self.n_seqs}")

    def setup_cache(self, max_seq_len: int, dtype: torch.dtype | str = torch.float16,
                    device: torch.device | str = "cpu", n_seqs: int = 1) -> None:
        """Preallocates K/V ``[n_seqs, slots, n_kv_heads, head_dim]`` (slots = window for
        window layers): ``max_seq_len`` positions for each of ``n_seqs`` sequences."""
        if max_seq_len <= 0:
            raise TpNumaError(f"context size must be positive, got {max_seq_len}")
        if n_seqs <= 0:
            raise TpNumaError(f"the number of KV sequences must be positive, got {n_seqs}")
        dtype = kv_cache_dtype(dtype)
        self.n_seqs = int(n_seqs)
        self.max_seq_len = int(max_seq_len)
        self.slots = self.max_seq_len if self.sliding_window is None else min(self.sliding_window, self.max_seq_len)
        row = self.head_dim
        if dtype is Q8_0_CACHE:
            if self.head_dim % 32:
                raise TpNumaError(f"layer {self.layer_idx}: a q8_0 KV cache needs head_dim divisible by 32, "
                                  f"got {self.head_dim} (use f16, bf16 or f32)")
            row = self.head_dim // 32 * 34
        shape = (self.n_seqs, self.slots, self.n_kv_heads, row)
        # zeros, not empty: first touch of the pages happens here, on this rank's node; on
        # the CPU in weight memory (huge pages from 2 MiB: every decode step reads it all)
        if torch.device(device).type == "cpu":
            self.k_cache, self.v_cache = memory.zeros(shape, dtype), memory.zeros(shape, dtype)
        else:
            self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def _native(self, q: torch.Tensor) -> bool:
        """Whether the native ops serve this call (decided once per device)."""
        if self.use_native is False or not q.is_cpu or not self.k_cache.is_cpu:
            return False
        if self._native_ok is None:
            self._native_ok = bool(self.use_native) or attention_ops.available()
        return self._native_ok

    def check_positions(self, start_pos: int, T: int, seq: int = 0) -> None:
        """Raises TpNumaError unless the cache exists, has sequence ``seq`` and positions
        start_pos..start_pos+T-1 fit it."""
        if self.k_cache is None:
            raise TpNumaError(f"layer {self.layer_idx}: setup_cache() was not called before forward()")
        if not 0 <= seq < self.n_seqs:
            raise TpNumaError(f"KV sequence {seq} does not exist (the cache holds {self.n_seqs})")
        if start_pos < 0 or start_pos + T > self.max_seq_len:
            raise TpNumaError(
                f"positions {start_pos}..{start_pos + T - 1} exceed the context size {self.max_seq_len} "
                "(raise the context size, e.g. -c / --ctx-size)")

    def _check_call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, seq: int = 0) -> int:
        """Checks the cache exists, the positions fit it and the shapes match; returns T."""
        T = q.shape[0]
        self.check_positions(start_pos, T, seq)
        if q.shape[1:] != (self.n_heads, self.head_dim) or k.shape != (T, self.n_kv_heads, self.head_dim) \
                or v.shape != k.shape:
            raise ValueError(f"layer {self.layer_idx}: bad shapes q {tuple(q.shape)} k {tuple(k.shape)} "
                             f"v {tuple(v.shape)} for heads {self.n_heads}/{self.n_kv_heads} x {self.head_dim}")
        return T

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions) -> torch.Tensor:
        """q [T, n_heads, D], k/v [T, n_kv, D] -> [T, n_heads*D].

        ``pos``: an int (the T tokens are positions pos..pos+T-1 of sequence 0) or a
        ``SeqBatch`` (each span's rows attend over their own sequence's cache)."""
        if not isinstance(pos, SeqBatch):
            return self._forward_seq(q, k, v, int(pos), 0, False)
        if q.shape[0] != pos.n_tokens:
            raise ValueError(f"layer {self.layer_idx}: {q.shape[0]} query rows for a batch of {pos.n_tokens} tokens")
        if len(pos.spans) == 1:
            s = pos.spans[0]
            return self._forward_seq(q, k, v, s.start, s.seq, s.prefill)
        return torch.cat([self._forward_seq(q[a:b], k[a:b], v[a:b], s.start, s.seq, s.prefill)
                          for s, a, b in pos.rows()])

    def _forward_seq(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
                     seq: int, prefill: bool) -> torch.Tensor:
        """T tokens of sequence ``seq`` at positions start_pos..start_pos+T-1 -> [T, n_heads*D];
        ``prefill``: a prompt chunk (the prefill kernel even for T = 1)."""
        T = self._check_call(q, k, v, start_pos, seq)
        kc, vc = self.k_cache[seq], self.v_cache[seq]          # (slots, n_kv, row) views
        if T == 1 and not prefill and self._native(q):
            return self._native_decode(q, k, v, start_pos, kc, vc)
        native = self._native(q)
        end = start_pos + T
        dt, D = kc.dtype, self.head_dim
        if end <= self.slots:
            # No wrap-around: slot == position, the cache prefix is the whole key sequence.
            kc[start_pos:end] = to_cache(k, dt)
            vc[start_pos:end] = to_cache(v, dt)
            if native:
                return self._native_prefill(q, kc, vc, end, start_pos)
            return attention_reference(q, from_cache(kc[:end], D), from_cache(vc[:end], D),
                                       start_pos, 0, self.scale, self.sliding_window).to(q.dtype)
        if T == 1 and not prefill:
            # (torch path) Decode on a full ring: the slots hold exactly the last `window`
            # positions, all visible from this query (order does not matter to softmax).
            kc[start_pos % self.slots] = to_cache(k[0], dt)
            vc[start_pos % self.slots] = to_cache(v[0], dt)
            return attention_reference(q, from_cache(kc, D), from_cache(vc, D), self.slots - 1, 0,
                                       self.scale, None).to(q.dtype)
        return self._prefill_wrapped(q, k, v, start_pos, native, kc, vc)

    def _prefill_wrapped(self, q, k, v, start_pos: int, native: bool, kc, vc) -> torch.Tensor:
        """Prefill on a window layer whose ring wraps: keys in position order = the ring's
        still-visible past (in order) + the new keys; then the ring keeps the newest slots."""
        T = q.shape[0]
        n_past = min(start_pos, self.slots)
        p0 = start_pos - n_past
        order = torch.arange(p0, start_pos, device=q.device) % self.slots
        dt = kc.dtype
        keys = torch.cat([kc[order], to_cache(k, dt)])     # (n_past + T, n_kv, D), positions p0..
        vals = torch.cat([vc[order], to_cache(v, dt)])
        keep = min(T, self.slots)
        slots = torch.arange(start_pos + T - keep, start_pos + T, device=q.device) % self.slots
        kc[slots] = keys[-keep:]
        vc[slots] = vals[-keep:]
        if native:
            return self._native_prefill(q, keys, vals, keys.shape[0], n_past)
        return attention_reference(q, from_cache(keys, self.head_dim), from_cache(vals, self.head_dim), start_pos, p0,
                                   self.scale, self.sliding_window).to(q.dtype)

    def _native_decode(self, q, k, v, start_pos: int, kc, vc) -> torch.Tensor:
        """One token: cache write and attention in one native call. The slot is
        ``start_pos % slots``; the keys visible are all filled slots (for a window layer
        whose ring has wrapped, exactly the last ``window`` positions)."""
        q0 = q[0]
        if q0.dtype != torch.float32 or not q0.is_contiguous():
            q0 = q0.float().contiguous()
        out = attention_ops.attn_decode_update(q0, k[0], v[0], kc, vc, start_pos % self.slots,
                                 min(start_pos + 1, self.slots), self.scale).view(1, -1)
        return out if q.dtype == torch.float32 else out.to(q.dtype)

    def _native_prefill(self, q, keys, vals, n_keys: int, q_offset: int) -> torch.Tensor:
        """Native blocked attention over keys[0:n_keys] in position order; query i sits at
        key index q_offset + i."""
        from ..attention_ops import attn_prefill

        window = -1 if self.sliding_window is None else self.sliding_window
        out = attn_prefill(q.float().contiguous(), keys, vals, n_keys, q_offset, self.scale, window)
        return out if q.dtype == torch.float32 else out.to(q.dtype)
