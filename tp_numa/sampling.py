"""Choosing the next token from a logit vector, with llama.cpp's semantics.

The chain, applied in llama.cpp's default order to the float32 logits ``z`` (vocab,):

1. penalties over the last ``repeat_last_n`` tokens (prompt included), llama.cpp's
   ``llama_sampler_penalties``: each recent token ``t``, seen ``c_t`` times there, gets
   the repetition penalty ``z_t / r`` if ``z_t > 0`` else ``z_t * r`` (so ``r > 1``
   always makes it less likely), then ``z_t -= c_t * frequency + presence`` (OpenAI's
   frequency and presence penalties; negative values favour repeats);
2. ``temperature <= 0``: greedy, ``argmax z`` (the first maximum). Otherwise:
3. top-k: keep the ``k`` largest logits (``k <= 0``: keep all);
4. top-p: with ``p = softmax(z)`` sorted descending, keep the shortest prefix whose
   cumulative probability reaches ``top_p`` (at least one token; ``top_p >= 1``: off);
5. min-p: keep tokens with ``p_t >= min_p * max(p)``, i.e. ``z_t >= max z + ln(min_p)``
   (``min_p <= 0``: off);
6. temperature: ``z / T``, then draw from ``softmax`` with a seeded ``torch.Generator``.

Steps 3-5 look at the untempered distribution, as llama.cpp does. Removed tokens get
``-inf``. Only rank 0 samples, so the generator state lives there alone.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import TpNumaError


@dataclass
class SamplingParams:
    """Sampling options; defaults are llama.cpp's (``temperature=0`` means greedy)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0   # subtracted once from every token in the window
    frequency_penalty: float = 0.0  # subtracted per occurrence in the window
    seed: int | None = None  # None: a fresh random seed

    def validate(self) -> None:
        """Raise ``TpNumaError`` naming the option for values outside their domain."""
        if not math.isfinite(self.temperature):
            raise TpNumaError(f"--temperature must be a finite number, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise TpNumaError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise TpNumaError(f"--min-p must be in [0, 1], got {self.min_p}")
        if not (self.repeat_penalty > 0.0 and math.isfinite(self.repeat_penalty)):
            raise TpNumaError(f"--repeat-penalty must be > 0, got {self.repeat_penalty}")
        for name, value in (("--presence-penalty", self.presence_penalty),
                            ("--frequency-penalty", self.frequency_penalty)):
            if not -2.0 <= value <= 2.0:  # also false for NaN
                raise TpNumaError(f"{name} must be in [-2, 2], got {value}")
        if self.repeat_last_n < 0:
            raise TpNumaError(f"--repeat-last-n must be >= 0, got {self.repeat_last_n}")
        if self.seed is not None and self.seed < 0:
            raise TpNumaError(f"--seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        """True when any penalty can change the logits."""
        return self.repeat_last_n > 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


def apply_repetition_penalty(logits: torch.Tensor, recent: Sequence[int], penalty: float) -> torch.Tensor:
    """Return logits (vocab,) with every distinct id in ``recent`` penalised:
    ``z / penalty`` where ``z > 0``, ``z * penalty`` where ``z <= 0``."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    out = logits.clone()
    ids = torch.tensor(sorted(set(int(t) for t in recent)), dtype=torch.long)
    z = out[ids]
    out[ids] = torch.where(z > 0, z / penalty, z * penalty)
    return out


def apply_penalties(logits: torch.Tensor, recent: Sequence[int], repeat: float = 1.0,
                    frequency: float = 0.0, presence: float = 0.0) -> torch.Tensor:
    """Return logits (vocab,) with llama.cpp's penalties for the tokens of ``recent``:
    the repetition penalty (``apply_repetition_penalty``), then
    ``z_t -= count_t * frequency + presence`` for every distinct ``t`` (``count_t``: its
    occurrences in ``recent``). With ``frequency == presence == 0`` this is exactly
    ``apply_repetition_penalty``."""
    out = apply_repetition_penalty(logits, recent, repeat)
    if (frequency == 0.0 and presence == 0.0) or len(recent) == 0:
        return out
    counts = Counter(int(t) for t in recent)
    ids = torch.tensor(sorted(counts), dtype=torch.long)
    n = torch.tensor([counts[int(t)] for t in ids], dtype=out.dtype)
    if out is logits:
        out = logits.clone()
    out[ids] = out[ids] - (n * frequency + presence)
    return out


def top_logprobs(logits: torch.Tensor, token_id: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """``(logprob of token_id, [(id, logprob)] of the n most likely tokens)``, most likely
    first, from ``log_softmax`` of ``logits`` as given (the raw model logits, before any
    penalty, filter or temperature: what OpenAI's ``logprobs`` report)."""
    lp = torch.log_softmax(logits.detach().to(torch.float32).reshape(-1), dim=-1)
    if not 0 <= token_id < lp.numel():
        raise ValueError(f"token id {token_id} outside the logits (size {lp.numel()})")
    top: list[tuple[int, float]] = []
    if n > 0:
        values, ids = torch.topk(lp, min(n, lp.numel()))
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
    return float(lp[token_id]), top


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits, -inf elsewhere; ``k <= 0`` or ``k >= vocab``: unchanged."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most probable tokens until their total probability reaches ``p``.

    With probabilities sorted descending, ``c_i = p_0 + ... + p_i``: the kept set is
    ``{0..j}`` for the first ``j`` with ``c_j >= p`` (the token that crosses ``p`` stays).
    """
    if p >= 1.0:
        return logits
    probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
    cum = torch.cumsum(probs, dim=-1)
    crossed = (cum >= p).nonzero()
    keep_n = int(crossed[0]) + 1 if crossed.numel() else logits.numel()
    out = torch.full_like(logits, -math.inf)
    kept = order[:keep_n]
    out[kept] = logits[kept]
    return out


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the largest one."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max() + math.log(min_p)
    return logits.masked_fill(logits < threshold, -math.inf)


class Sampler:
    """Stateful sampler: ``sampler(logits, history) -> token id``.

    ``history`` is every token so far (prompt and generated); the penalty looks at its
    last ``repeat_last_n`` entries.
    """

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """logits: float (vocab,) for the next position."""
        p = self.params
        z = logits.detach().to(torch.float32).reshape(-1)
        if p.penalised:
            z = apply_penalties(z, history[-p.repeat_last_n:], p.repeat_penalty,
                                p.frequency_penalty, p.presence_penalty)
        if p.greedy:
            return int(torch.argmax(z))
        z = top_k_filter(z, p.top_k)
        z = top_p_filter(z, p.top_p)
        z = min_p_filter(z, p.min_p)
        probs = torch.softmax(z / p.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
