"""Attention core offloaded to another device (a CUDA GPU), with its KV cache there.

Same contract as ``tp_numa.layers.attention.Attention`` (it is a subclass, so code that
looks for attention layers finds it): ``forward(q, k, v, start_pos)`` with q ``[T, H, D]``
and k/v ``[T, n_kv, D]`` on the CPU, already projected, normed and RoPE'd by the CPU
rank, returns float32 ``[T, H*D]`` on the CPU for the output projection. Inside a whole
decoder layer on the device (``tp_numa.layers.device_layer``) q/k/v are already on the
device: then they are used in place and the output stays there (steps 1 and 4 skipped).
In between:

1. q/k/v go to the device. On CUDA they are first copied into pinned (page-locked) host
   buffers, so the host->device copies can be asynchronous (``non_blocking``) DMA.
2. k/v are written into the device-resident cache at positions ``start_pos..start_pos+T-1``
   (rounded to the cache dtype, as on the CPU path).
3. ``torch.nn.functional.scaled_dot_product_attention`` runs over the cache with
   ``enable_gqa`` (query head h reads KV head ``h // (H / n_kv)``) and the visibility rule
   of the CPU path: query at position t sees key p iff ``p <= t`` and (no window or
   ``t - p < window``). Only keys that can be visible are passed: from
   ``max(0, start_pos - window + 1)`` on, so a one-token decode needs no mask at all.
4. The output comes back through a pinned buffer; one stream synchronisation before
   returning makes it safe to reuse the buffers on the next call.

The device cache keeps every position (``[max_seq_len, n_kv, D]``) even for sliding-window
layers: a window only selects which slice is read. Device memory is rarely the limit for
the models this engine targets, and a flat cache keeps each decode read contiguous.

Compute dtype: on CUDA the cache dtype (fp16/bf16 run on tensor cores; SDPA accumulates in
fp32); elsewhere float32 over the rounded cache values, which is exactly what the CPU path
computes, so ``device="cpu"`` is a faithful stand-in for tests on machines without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import TpNumaError
from .attention import Q8_0_CACHE, Attention, kv_cache_dtype
from .batch import Positions, SeqBatch


class DeviceAttention(Attention):
    """Attention of one layer with its KV cache on ``device`` (``"cuda:N"``, or ``"cpu"``)."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None, layer_idx: int, device: torch.device | str):
        super().__init__(n_heads, n_kv_heads, head_dim, scale, sliding_window, layer_idx, use_native=False)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TpNumaError(f"layer {layer_idx}: attention is placed on {self.device}, but CUDA is not available")
        if self.device.type == "cuda" and self.device.index is None:
            # a concrete index, so tensors' devices compare equal to it
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.compute_dtype = torch.float32
        self._pinned: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_attention(cls, attn: Attention, device: torch.device | str) -> "DeviceAttention":
        """A DeviceAttention with the same heads, scale and window as ``attn`` (cache not copied:
        call before ``setup_cache``)."""
        return cls(attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.scale, attn.sliding_window,
                   attn.layer_idx, device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", device={self.device}"

    def setup_cache(self, max_seq_len: int, dtype: torch.dtype | str = torch.float16,
                    device: torch.device | str | None = None, n_seqs: int = 1) -> None:
        """Allocates K/V ``[n_seqs, max_seq_len, n_kv_heads, head_dim]`` on this module's device.

        ``device`` is ignored: the placement decided the device when this module was made.
        """
        if max_seq_len <= 0:
            raise TpNumaError(f"context size must be positive, got {max_seq_len}")
        if n_seqs <= 0:
            raise TpNumaError(f"the number of KV sequences must be positive, got {n_seqs}")
        dtype = kv_cache_dtype(dtype)
        if dtype is Q8_0_CACHE:
            raise TpNumaError(f"layer {self.layer_idx}: a q8_0 KV cache is CPU only; attention placed on "
                              f"{self.device} needs f16, bf16 or f32 (--cache-type)")
        self.max_seq_len = self.slots = int(max_seq_len)
        self.n_seqs = int(n_seqs)
        shape = (self.n_seqs, self.slots, self.n_kv_heads, self.head_dim)
        self.k_cache = self.v_cache = None  # free the old cache first: device memory is the limit
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        on_gpu = self.device.type == "cuda"
        self.compute_dtype = dtype if on_gpu else torch.float32

    # ---- host <-> device ----
    def _staging(self, tag: str, like: torch.Tensor) -> torch.Tensor:
        """A pinned host buffer with room for ``like`` (grown on demand, reused across calls)."""
        key = (tag, like.dtype)
        buf = self._pinned.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = torch.empty(max(like.numel(), 1), dtype=like.dtype, pin_memory=True)
            self._pinned[key] = buf
        return buf[:like.numel()].view(like.shape)

    def _upload(self, tag: str, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t                    # produced on the device (a whole layer there)
        if self.device.type != "cuda":
            return t.to(self.device)
        host = self._staging(tag, t)
        host.copy_(t)
        return host.to(self.device, non_blocking=True)

    def _download(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to("cpu")
        host = self._staging("out", t)
        host.copy_(t, non_blocking=True)
        # Waits for the whole stream (uploads included), so the pinned buffers are free
        # for the next call and `host` holds the result.
        torch.cuda.current_stream(self.device).synchronize()
        return host.clone()

    # ---- attention ----
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions) -> torch.Tensor:
        """q [T, n_heads, D], k/v [T, n_kv, D] at ``pos`` (an int start of sequence 0, or a
        ``SeqBatch``) -> float32 [T, n_heads*D] on q's device (the CPU, or this module's
        device when q was computed there). One upload of q/k/v and one download per call."""
        resident = q.device == self.device
        qd, kd, vd = self._upload("q", q), self._upload("k", k), self._upload("v", v)
        if not isinstance(pos, SeqBatch):
            out = self._forward_seq(qd, kd, vd, int(pos), 0)
        elif len(pos.spans) == 1:
            out = self._forward_seq(qd, kd, vd, pos.spans[0].start, pos.spans[0].seq)
        else:
            out = torch.cat([self._forward_seq(qd[a:b], kd[a:b], vd[a:b], s.start, s.seq) for s, a, b in pos.rows()])
        return out if resident else self._download(out)

    def _forward_seq(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
                     seq: int) -> torch.Tensor:
        """Device tensors of T tokens of sequence ``seq``: cache write, then attention."""
        T = self._check_call(q, k, v, start_pos, seq)
        end = start_pos + T
        self.k_cache[seq, start_pos:end] = k
        self.v_cache[seq, start_pos:end] = v
        return self._attend(q, start_pos, end, seq)

    def _attend(self, q: torch.Tensor, start_pos: int, end: int, seq: int) -> torch.Tensor:
        """Device-side attention of queries at start_pos..end-1 over the cached keys -> float32 [T, H*D]."""
        T, H, D = q.shape
        w = self.sliding_window
        first = 0 if w is None else max(0, start_pos - w + 1)     # oldest key any query can see
        cdt = self.compute_dtype
        qh = q.to(cdt).transpose(0, 1).unsqueeze(0)                          # (1, H, T, D)
        kh = self.k_cache[seq, first:end].to(cdt).transpose(0, 1).unsqueeze(0)   # (1, n_kv, L, D)
        vh = self.v_cache[seq, first:end].to(cdt).transpose(0, 1).unsqueeze(0)   # (1, n_kv, L, D)
        mask = None
        if T > 1:
            # query i is at position start_pos + i, key j at first + j
            qpos = torch.arange(start_pos, end, device=q.device).unsqueeze(1)      # (T, 1)
            kpos = torch.arange(first, end, device=q.device).unsqueeze(0)          # (1, L)
            mask = kpos <= qpos
            if w is not None:
                mask &= (qpos - kpos) < w
        # T == 1: every key in [first, end) is visible to the query at end - 1.
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.n_heads != self.n_kv_heads)  # (1, H, T, D)
        return out[0].transpose(0, 1).reshape(T, H * D).float()
