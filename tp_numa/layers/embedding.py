"""Vocab-parallel token embedding and LM head.

The vocabulary ``[0, V)`` is split into contiguous row ranges, one per rank; a rank holds
raw GGUF rows ``[v0, v1)`` of ``token_embd`` (and of ``output``, or shares the embedding
rows when the output is tied to it).

- embedding: each rank dequantizes only the looked-up rows that fall in its range
  (the rest are zero) and the all-reduce sums the one non-zero contribution per token.
- LM head: ``logits_r = h @ E[v0:v1]^T`` on each rank, gathered along the vocab to
  rank 0 (``None`` on the others).
"""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import parallel_state
from ..errors import ModelFormatError
from ..gguf_loader import GGUFFile
from .partition import Range, partition_rows
from .. import ops
from .quant import linear_method_for, method_of, shared_x4_weight, x4_pays


class VocabParallelEmbedding(nn.Module):
    """tokens [T] -> [T, d] float32; rank r holds vocab rows ``vocab_range``."""

    def __init__(self, vocab_size: int, embedding_dim: int, vocab_range: Range | None = None,
                 name: str = "token_embd.weight", tp_size: int | None = None):
        super().__init__()
        st = parallel_state.get()
        self.tp_size = st.tp_size if tp_size is None else tp_size
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        if vocab_range is None:
            vocab_range = partition_rows(name, vocab_size, st.tp_size)[st.tp_rank]
        self.vocab_range = tuple(vocab_range)
        self.register_buffer("weight", None, persistent=False)
        self.qtype = -1
        self.packed_rows: int | None = None   # rows of the x4-packed weight (None: raw rows)

    def load_gguf(self, f: GGUFFile, name: str) -> None:
        info = f.info(name)
        if info.shape != (self.vocab_size, self.embedding_dim):
            raise ModelFormatError(
                f"{f.path}: tensor '{name}' has shape {list(info.shape)}, "
                f"expected [{self.vocab_size}, {self.embedding_dim}]")
        self.weight = f.read_rows(name, *self.vocab_range)
        self.qtype = int(info.qtype)
        self.packed_rows = None

    def repack_x4(self) -> bool:
        """Repack this rank's rows into the x4 layout (``ops.pack_x4``) so a tied LM head
        sharing them runs the x4 GEMV; lookups then unpack the few groups they touch.
        False (rows unchanged) when the type has no x4 layout or TP_NUMA_X4=0."""
        if self.packed_rows is not None:
            return True
        if not x4_pays(self.qtype):
            return False
        self.packed_rows = int(self.weight.shape[0])
        self.weight = ops.pack_x4(self.weight, self.qtype)
        return True

    def _raw_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Raw GGUF rows [n, row_bytes] of local row ids [n]."""
        if self.packed_rows is None:
            return self.weight[local]
        if local.numel() == 1:      # a decode step: unpack the one group of 4 rows
            i = int(local[0])
            return ops.unpack_x4(self.weight[i // 4:i // 4 + 1], self.qtype, 4)[i % 4:i % 4 + 1]
        groups, inverse = torch.unique(local // 4, return_inverse=True)
        raw = ops.unpack_x4(self.weight[groups].contiguous(), self.qtype, 4 * groups.numel())
        return raw[inverse * 4 + local % 4]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        v0, v1 = self.vocab_range
        n = tokens.numel()
        if n == 0:
            lo = hi = v0
        elif n == 1:                  # a decode step: no reductions
            lo = hi = int(tokens[0])
        else:
            lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)][0].item()
            raise ValueError(f"token id {bad} outside the vocabulary [0, {self.vocab_size})")
        if n and v0 <= lo and hi < v1:
            # every token in this rank's rows (always so at tp=1); ops.dequantize is
            # bitwise gguf.quants.dequantize
            out = ops.dequantize(self._raw_rows(tokens - v0), self.qtype)
        else:
            mine = (tokens >= v0) & (tokens < v1)
            out = torch.zeros((tokens.shape[0], self.embedding_dim), dtype=torch.float32)
            if bool(mine.any()):
                local = tokens[mine] - v0
                out[mine] = ops.dequantize(self._raw_rows(local), self.qtype)
        if self.tp_size > 1:
            from ..distributed import communicator

            communicator.all_reduce(out)
        return out


class ParallelLMHead(nn.Module):
    """h [T, d] -> logits float32 [T, V] on rank 0 (None elsewhere); vocab split over ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, vocab_range: Range | None = None,
                 name: str = "output.weight", tp_size: int | None = None):
        super().__init__()
        st = parallel_state.get()
        self.tp_size = st.tp_size if tp_size is None else tp_size
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        all_ranges = partition_rows(name, vocab_size, self.tp_size)
        self.vocab_range = tuple(vocab_range) if vocab_range is not None else all_ranges[st.tp_rank]
        self.sizes = [b - a for a, b in all_ranges]
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)   # output.bias (qwen2), this rank's rows
        self.weight_qtype = -1
        self.softcap: float | None = None

    def load_gguf(self, f: GGUFFile, name: str) -> None:
        info = f.info(name)
        if info.shape != (self.vocab_size, self.hidden_size):
            raise ModelFormatError(
                f"{f.path}: tensor '{name}' has shape {list(info.shape)}, "
                f"expected [{self.vocab_size}, {self.hidden_size}]")
        # untied: the head owns its rows, so it may be repacked (x4 layout, see quant.x4_pays)
        rows = f.read_rows(name, *self.vocab_range)
        linear_method_for(int(info.qtype), repack=True).create_weights(
            self, "weight", rows, int(info.qtype))

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's rows (tied output): same vocab split, no second copy. Types
        with an x4 layout are repacked in the embedding first (the head's GEMV is the
        larger cost: every row every step, against a few looked-up rows)."""
        assert embedding.vocab_range == self.vocab_range
        if embedding.repack_x4():
            shared_x4_weight(self, "weight", embedding.weight, embedding.qtype, embedding.packed_rows)
        else:
            linear_method_for(embedding.qtype).create_weights(self, "weight", embedding.weight, embedding.qtype)

    def load_bias(self, f: GGUFFile, name: str) -> None:
        """The output bias [V] (llama.cpp adds it when the file has one): this rank's entries."""
        info = f.info(name)
        if info.shape != (self.vocab_size,):
            raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(info.shape)}, expected [{self.vocab_size}]")
        self.bias = f.read_float(name, *self.vocab_range)

    def forward(self, h: torch.Tensor) -> torch.Tensor | None:
        logits = method_of(self, "weight").apply(self, "weight", h)   # (T, v1 - v0)
        if self.bias is not None:
            logits = logits.add_(self.bias)
        if self.tp_size > 1:
            from ..distributed import communicator

            logits = communicator.gather_to_main(logits, dim=1, sizes=self.sizes)   # (T, V) on rank 0
            if logits is None:
                return None
        if self.softcap is not None:
            # final logit soft-capping: cap * tanh(logits / cap)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()
