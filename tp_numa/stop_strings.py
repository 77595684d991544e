"""Holding back streamed text that might be the start of a stop string.

Text arrives in pieces (one per token). A stop string may span pieces, so the tail of
what has arrived that is a prefix of some stop string is held back until the next piece
decides it: either the stop string completes (the text before it is released and
generation ends; the stop string itself is never shown) or the match breaks (the held
text is released). Everything else is released at once, so streaming stays immediate.
"""
from __future__ import annotations

from typing import Sequence


class StopStringFilter:
    """``push(piece) -> (text to emit now, stopped)``; ``flush()`` at the end."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        self.pending += piece
        # The stop string that completes first (as if text came one character at a
        # time), so the result does not depend on how the text was cut into pieces.
        hits = [(i + len(s), i) for s, i in ((s, self.pending.find(s)) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)[1]]
            self.pending = ""
            self.stopped = True
            return out, True
        keep = self._partial_len(self.pending)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        """Release what is held back (generation ended without completing a stop string)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
