"""The contract between the HTTP layer and the batch engine (both on rank 0).

The HTTP layer turns an OpenAI request into a ``GenRequest`` (prompt token ids, limits,
sampling, stop strings) and hands it to ``BatchEngine.submit(req, on_event)``; the engine
calls ``on_event(Event)`` from its own thread as the request advances: zero or more events
with new text, then exactly one final event (``finish_reason`` set, ``usage`` filled).
``on_event`` must be quick and thread-safe (e.g. ``loop.call_soon_threadsafe(queue.put_nowait, ev)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling import SamplingParams

# finish reasons, as OpenAI names them ("abort": the client went away; "error": see Event.error)
FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"


class QueueFull(Exception):
    """``submit`` refused the request: every slot is busy and the wait queue is full (HTTP 503)."""


@dataclass
class GenRequest:
    """One generation request.

    - ``prompt_ids``: the tokens the model sees (chat template already applied), non-empty;
    - ``max_tokens``: generated tokens at most (the end-of-generation token is not counted);
    - ``sampling``: llama.cpp-style sampling (``tp_numa.sampling``; temperature 0 = greedy);
    - ``stop``: stop strings (the text stops before the first one; it is not shown);
    - ``logprobs``: 0 = none; n > 0 = the chosen token's logprob and the n most likely
      alternatives at every generated position;
    - ``ignore_eos``: keep generating past end-of-generation tokens.
    """

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    logprobs: int = 0
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    """One generated token: its id, text, natural-log probability, and the top alternatives
    ``[(token_id, text, logprob), ...]`` (most likely first; ``GenRequest.logprobs`` of them).
    Probabilities are ``log_softmax`` of the model's logits at that position."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0        # prompt tokens whose KV entries were reused (prefix cache)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Event:
    """Progress of one request: ``text`` to append (may be empty: held back for a stop
    string), the ``token_ids`` generated since the previous event, their ``logprobs``
    (when asked for), and on the final event ``finish_reason`` and ``usage``
    (``error`` with ``finish_reason == "error"``)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None
