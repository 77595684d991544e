"""Which sequence and position every token of a forward belongs to.

A forward runs ``T`` tokens ``tokens[0..T)`` through the layers as one ``[T, d]`` matrix: every
linear layer, norm and MLP treats the rows alike, so tokens of different requests can share
one matrix product (the weights are read once for all of them). Only two things look at
which request a row belongs to: RoPE (the row's position) and attention (the row's KV-cache
sequence and the keys before it). ``SeqBatch`` says both.

The tokens are consecutive *spans*: span ``j`` is ``length_j`` tokens of KV sequence
``seq_j`` at positions ``start_j .. start_j + length_j - 1``. A prompt chunk is one span of
its prompt's tokens; a decode step of M running requests is M spans of one token each.
Spans of one batch name distinct sequences (a sequence's tokens of one step are one span).

A span marked ``prefill`` is part of a prompt: attention runs its blocked prefill kernel
on it even for a single token, so a prompt's keys and logits do not depend on how it was
cut into chunks (or how much of it a reused prefix already covered). Unmarked spans of one
token are decode steps (the one-token kernel, and the native decode step when every span
of the batch is one).

A plain ``int`` start position where a ``SeqBatch`` is accepted means one span of sequence 0
(``SeqBatch.one``): the single-request path of ``tp-numa generate``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

import torch

from ..errors import TpNumaError


@dataclass(frozen=True)
class Span:
    """``length`` tokens of KV sequence ``seq`` at positions ``start .. start + length - 1``
    (``prefill``: a prompt chunk, see the module docstring)."""

    seq: int
    start: int
    length: int
    prefill: bool = False


class SeqBatch:
    """The spans of one forward, in token order (see the module docstring)."""

    __slots__ = ("spans", "n_tokens", "_positions")

    def __init__(self, spans):
        self.spans: tuple[Span, ...] = tuple(spans)
        if not self.spans:
            raise TpNumaError("a batch needs at least one span")
        seqs = [s.seq for s in self.spans]
        if len(set(seqs)) != len(seqs):
            raise TpNumaError(f"a batch names a sequence twice: {seqs}")
        for s in self.spans:
            if s.length < 1 or s.start < 0 or s.seq < 0:
                raise TpNumaError(f"bad span {s}")
        self.n_tokens = sum(s.length for s in self.spans)
        self._positions: torch.Tensor | None = None

    @classmethod
    def one(cls, start_pos: int, length: int, seq: int = 0, prefill: bool = False) -> "SeqBatch":
        """One span: ``length`` tokens of sequence ``seq`` from ``start_pos``."""
        return cls([Span(seq, int(start_pos), int(length), bool(prefill))])

    @property
    def is_decode(self) -> bool:
        """Every span is a single decode token (a decode step of ``len(spans)`` sequences)."""
        return self.n_tokens == len(self.spans) and not any(s.prefill for s in self.spans)

    def positions(self) -> torch.Tensor:
        """int64 [T]: the position of every token."""
        if self._positions is None:
            self._positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in self.spans])
        return self._positions

    def seqs(self) -> torch.Tensor:
        """int64 [T]: the KV sequence of every token."""
        return torch.cat([torch.full((s.length,), s.seq, dtype=torch.int64) for s in self.spans])

    def last_rows(self) -> list[int]:
        """Row index of each span's last token (where its next-token logits come from)."""
        out, row = [], 0
        for s in self.spans:
            row += s.length
            out.append(row - 1)
        return out

    def rows(self) -> Iterator[tuple[Span, int, int]]:
        """(span, first row, end row) of every span."""
        row = 0
        for s in self.spans:
            yield s, row, row + s.length
            row += s.length

    def __repr__(self) -> str:
        return "SeqBatch(" + ", ".join(f"seq {s.seq} @{s.start}+{s.length}" for s in self.spans) + ")"


Positions = Union[int, SeqBatch]


def as_batch(pos: Positions, n_tokens: int) -> SeqBatch:
    """``pos`` as a SeqBatch: an int is one span of sequence 0 of ``n_tokens`` tokens."""
    if isinstance(pos, SeqBatch):
        if pos.n_tokens != n_tokens:
            raise ValueError(f"the batch has {pos.n_tokens} tokens but the input {n_tokens} rows")
        return pos
    return SeqBatch.one(int(pos), n_tokens)
