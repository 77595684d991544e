"""``BatchEngine``: continuous batching over the KV slots of a loaded model, on every rank.

Slots: the model is loaded with ``n_slots`` KV sequences (``LLM.load(sequences=n)``) of
``slot_context`` positions each. A running request owns one slot; a slot also remembers the
tokens whose keys/values it holds (``Slot.tokens``: positions ``0..len-1``), after its
request is done too, for prefix reuse.

A step (rank 0 decides it, ``_plan_step``):

1. finished and cancelled requests leave their slots; waiting requests are admitted into
   free slots, FIFO. A new request takes the slot holding the longest prefix of its prompt;
   if that slot is busy (a running request), the prefix's KV entries are copied into a free
   slot first (``copies``). At least the last prompt token is always recomputed (its
   logits give the first generated token);
2. every request that is generating contributes one token (its last sampled one) at the
   next position of its slot: a decode span of length 1;
3. the rest of the step's token budget (``prefill_chunk``) goes to prompts still being
   read, in admission order, as chunks (chunked prefill beside the decode rows);
4. all spans run as one forward (``SeqBatch``): every weight matrix is read once for all
   the step's rows, attention runs per span over its own slot. Rank 0 samples the next
   token of every span that ends a prompt or is a decode row.

Under ``mpirun`` rank 0 sends each step (copies, spans, token ids) to the other ranks
(``_send``), which run the same forward (``_follow``); they wait for the next step with a
probe-and-sleep loop, so an idle server does not spin the cores. ``shutdown()`` sends a stop.

Results do not depend on the batch: a row's matmul results do not depend on the other rows
(batch-invariant kernels, docs/kernels.md), attention of a span reads only its own slot,
and sampling state is per request (seeded generator, history).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..distributed import parallel_state
from ..errors import TpNumaError
from ..layers.batch import SeqBatch, Span
from ..sampling import Sampler
from ..stop_strings import StopStringFilter
from .requests import (FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Event, GenRequest, QueueFull,
                       TokenLogprob, Usage)

_STEP_TAG = 7301          # MPI tag of the step messages rank 0 sends to the other ranks
_IDLE_SLEEP_S = 0.0005    # follower poll interval once the spin phase is over
_SPIN_S = 0.002           # followers spin this long after a step before sleeping between polls


@dataclass
class Slot:
    """One KV sequence: ``tokens`` are the ids whose K/V it holds at positions 0..len-1."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    owner: "_Running | None" = None
    last_used: float = 0.0


@dataclass
class _Running:
    """A request in a slot (rank 0's bookkeeping)."""

    rid: int
    req: GenRequest
    on_event: Callable[[Event], None]
    slot: Slot
    sampler: Sampler
    decoder: object
    stopper: StopStringFilter
    history: list[int]
    cached: int                       # prompt tokens whose KV entries were reused
    fed: int                          # prompt tokens in the slot (cached + prefilled)
    generated: list[int] = field(default_factory=list)
    next_id: int | None = None        # sampled, not yet fed
    finish: str | None = None
    error: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.req.prompt_ids)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchEngine:
    """Scheduler and step loop of ``tp-numa serve`` (module docstring); one per process."""

    def __init__(self, llm, *, n_slots: int, max_queue: int = 64, prefill_chunk: int = 256):
        if n_slots < 1:
            raise TpNumaError(f"--parallel must be >= 1, got {n_slots}")
        if max_queue < 0:
            raise TpNumaError(f"--max-queue must be >= 0, got {max_queue}")
        if prefill_chunk < 1:
            raise TpNumaError(f"prefill chunk must be >= 1, got {prefill_chunk}")
        self.llm = llm
        self.model = llm.model
        attns = [layer.self_attn.attn for layer in self.model.model.layers]
        have = {int(a.n_seqs) for a in attns}
        if have != {n_slots}:
            raise TpNumaError(f"the model was loaded with {sorted(have)} KV sequences, the engine needs {n_slots} "
                              f"(LLM.load(..., sequences={n_slots}))")
        self.n_slots = n_slots
        self.slot_context = int(llm.max_context)
        # a sliding-window layer keeps only its last `slots` positions (a ring): a prefix of
        # a slot's tokens is reusable only while the ring has not overwritten it
        self._ring = min(int(a.slots) for a in attns)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.is_main = llm.state.is_main
        self.world = llm.state.world_size
        self._comm = parallel_state.mpi_comm() if self.world > 1 else None
        self.slots = [Slot(i) for i in range(n_slots)]
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[tuple[int, GenRequest, Callable[[Event], None]]] = deque()
        self._cancelled: set[int] = set()
        self._running: list[_Running] = []
        self._next_rid = 1
        self._stop = False
        self._metrics = {"requests_total": 0, "prompt_tokens_total": 0, "generated_tokens_total": 0,
                         "cached_tokens_total": 0, "steps_total": 0, "step_seconds_total": 0.0,
                         "step_rows_total": 0, "requests_failed_total": 0}

    # ---- the HTTP side (rank 0, any thread) -------------------------------------------

    def submit(self, req: GenRequest, on_event: Callable[[Event], None]) -> int:
        """Queue ``req``; events go to ``on_event`` (engine thread). Returns the request id.
        Raises ``TpNumaError`` for a request that cannot run, ``QueueFull`` when the wait
        queue is full."""
        self._check_request(req)
        with self._lock:
            if self._stop:
                raise QueueFull("the server is shutting down")
            free = sum(1 for s in self.slots if s.owner is None)
            if len(self._waiting) >= free + self.max_queue:
                raise QueueFull(f"all {self.n_slots} slots are busy and {len(self._waiting)} requests are waiting "
                                f"(--max-queue {self.max_queue}); retry later")
            rid = self._next_rid
            self._next_rid += 1
            self._waiting.append((rid, req, on_event))
            self._metrics["requests_total"] += 1
            self._wake.notify()
        return rid

    def _check_request(self, req: GenRequest) -> None:
        n = len(req.prompt_ids)
        if n == 0:
            raise TpNumaError("the prompt is empty (no tokens)")
        if n >= self.slot_context:
            raise TpNumaError(f"the prompt has {n} tokens but a slot holds {self.slot_context} positions "
                              f"(prompt and generated tokens together); shorten it or raise --ctx-size")
        vocab = int(self.llm.config.vocab_size)
        bad = next((t for t in req.prompt_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise TpNumaError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if req.max_tokens < 0:
            raise TpNumaError(f"max_tokens must be >= 0, got {req.max_tokens}")
        if req.logprobs < 0:
            raise TpNumaError(f"logprobs must be >= 0, got {req.logprobs}")
        req.sampling.validate()

    def cancel(self, request_id: int) -> None:
        """End request ``request_id`` (finish "abort") and free its slot at the next step."""
        with self._lock:
            self._cancelled.add(int(request_id))
            self._wake.notify()

    def shutdown(self) -> None:
        """Make ``run`` return on every rank (after the current step)."""
        with self._lock:
            self._stop = True
            self._wake.notify()

    def metrics(self) -> dict:
        """A snapshot of the counters (names in the module's contract, requests.py users)."""
        with self._lock:
            m = dict(self._metrics)
            m["requests_running"] = len(self._running)
            m["requests_waiting"] = len(self._waiting)
            m["slots"] = self.n_slots
            m["slots_busy"] = sum(1 for s in self.slots if s.owner is not None)
        return m

    # ---- the loop (every rank, main thread) -------------------------------------------

    def run(self) -> None:
        """Serve steps until ``shutdown()``: rank 0 plans, broadcasts, runs and samples;
        the other ranks follow its steps."""
        if not self.is_main:
            self._follow()
            return
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._waiting and not self._running and not self._cancelled:
                        self._wake.wait()
                    if self._stop:
                        break
                    admitted, cancelled = self._take_new()
                self._apply_cancels(cancelled)
                copies = self._admit(admitted)
                step = self._plan_step()
                if step is None and not copies:
                    continue
                spans, tokens = step if step is not None else ([], [])
                self._send(("step", copies, [(s.seq, s.start, s.length, s.prefill) for s in spans], tokens))
                t0 = time.perf_counter()
                logits = self._execute(copies, spans, tokens)
                dt = time.perf_counter() - t0
                if spans:
                    self._after_step(spans, logits)
                with self._lock:
                    self._metrics["steps_total"] += 1
                    self._metrics["step_seconds_total"] += dt
                    self._metrics["step_rows_total"] += len(tokens)
        finally:
            self._send(("stop",))
            self._abort_all("the server is shutting down")

    def _take_new(self):
        """(under the lock) waiting requests that fit free slots now, and cancelled ids."""
        free = sum(1 for s in self.slots if s.owner is None)
        admitted = []
        while self._waiting and len(admitted) < free:
            admitted.append(self._waiting.popleft())
        cancelled, self._cancelled = self._cancelled, set()
        # a request cancelled while it waited never starts
        if cancelled:
            keep = deque()
            for item in self._waiting:
                if item[0] in cancelled:
                    self._emit_final_unstarted(item, FINISH_ABORT)
                else:
                    keep.append(item)
            self._waiting = keep
            gone = [a for a in admitted if a[0] in cancelled]
            for a in gone:
                self._emit_final_unstarted(a, FINISH_ABORT)
            admitted = [a for a in admitted if a[0] not in cancelled]
        return admitted, cancelled

    def _emit_final_unstarted(self, item, reason: str) -> None:
        rid, req, on_event = item
        _safe_call(on_event, Event(finish_reason=reason, usage=Usage(len(req.prompt_ids), 0, 0)))

    def _apply_cancels(self, cancelled: set[int]) -> None:
        for r in self._running:
            if r.rid in cancelled:
                self._finish(r, FINISH_ABORT)
        self._running = [r for r in self._running if r.finish is None]

    def _admit(self, admitted) -> list[tuple[int, int, int]]:
        """Puts admitted requests into slots (prefix reuse); returns KV copies (src, dst, n)."""
        copies = []
        for rid, req, on_event in admitted:
            prompt = list(req.prompt_ids)
            reuse = {s.seq: self._reusable(s, prompt) for s in self.slots}
            free = [s for s in self.slots if s.owner is None]
            best_n = max(reuse.values())
            # the free slot that keeps the least worth keeping: shortest reusable prefix, oldest
            spare = min(free, key=lambda s: (reuse[s.seq], s.last_used))
            own = [s for s in free if reuse[s.seq] == best_n]
            if best_n == 0:
                slot, n = spare, 0
            elif own:
                slot, n = min(own, key=lambda s: s.last_used), best_n
            else:
                # the prefix sits in a running request's slot: copy its KV entries over
                src = next(s for s in self.slots if reuse[s.seq] == best_n)
                slot, n = spare, best_n
                copies.append((src.seq, slot.seq, n))
                slot.tokens = list(src.tokens[:n])
            slot.tokens = slot.tokens[:n]
            tok = self.llm.tokenizer
            run = _Running(rid=rid, req=req, on_event=on_event, slot=slot, sampler=Sampler(req.sampling),
                           decoder=tok.stream_decoder(), stopper=StopStringFilter(req.stop),
                           history=list(prompt), cached=n, fed=n)
            slot.owner = run
            slot.last_used = time.monotonic()
            self._running.append(run)
            with self._lock:
                self._metrics["prompt_tokens_total"] += len(prompt)
                self._metrics["cached_tokens_total"] += n
            if req.max_tokens == 0:
                self._finish(run, FINISH_LENGTH)
        self._running = [r for r in self._running if r.finish is None]
        return copies

    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        """Prompt tokens whose KV entries ``slot`` holds and can lend (at most len - 1: the
        last prompt token is always run, for its logits)."""
        n = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
        if n < len(slot.tokens) and len(slot.tokens) > self._ring:
            return 0      # a window layer's ring has overwritten positions of that prefix
        return n

    def _plan_step(self):
        """Spans and token ids of the next forward, or None when nothing runs."""
        spans, tokens = [], []
        for r in self._running:
            if r.finish is None and not r.prefilling and r.next_id is not None:
                spans.append(Span(r.slot.seq, len(r.slot.tokens), 1))
                tokens.append(r.next_id)
        budget = max(self.prefill_chunk - len(tokens), 1)
        for r in self._running:
            if budget <= 0:
                break
            if r.finish is None and r.prefilling:
                start = r.fed
                n = min(len(r.req.prompt_ids) - start, budget)
                spans.append(Span(r.slot.seq, start, n, prefill=True))
                tokens.extend(r.req.prompt_ids[start:start + n])
                budget -= n
        if not spans:
            return None
        return spans, tokens

    def _execute(self, copies, spans: list[Span], tokens: list[int]):
        """The step on this rank: KV copies, then one forward of every span. Logits [n_spans,
        vocab] on rank 0 (None elsewhere, or with no spans)."""
        if copies:
            self.copy_kv(copies)
        if not spans:
            return None
        batch = SeqBatch(spans)
        with torch.inference_mode():
            return self.model.forward(torch.tensor(tokens, dtype=torch.long), batch, last_only=True)

    def copy_kv(self, copies) -> None:
        """K/V entries of positions [0, n) of sequence src into sequence dst, every layer."""
        for layer in self.model.model.layers:
            a = layer.self_attn.attn
            for src, dst, n in copies:
                a.k_cache[dst, :n] = a.k_cache[src, :n]
                a.v_cache[dst, :n] = a.v_cache[src, :n]

    def _after_step(self, spans: list[Span], logits: torch.Tensor) -> None:
        """Rank 0: the slots learn their new tokens; spans that end a prompt or decode sample."""
        by_seq = {r.slot.seq: r for r in self._running if r.finish is None}
        for j, s in enumerate(spans):
            r = by_seq.get(s.seq)
            if r is None:
                continue
            if r.prefilling:
                r.slot.tokens.extend(r.req.prompt_ids[s.start:s.start + s.length])
                r.fed += s.length
                if r.prefilling:
                    continue      # more of the prompt to read
            else:
                r.slot.tokens.append(r.next_id)
                r.next_id = None
            self._sample(r, logits[j])
        self._running = [r for r in self._running if r.finish is None]

    def _sample(self, r: _Running, z: torch.Tensor) -> None:
        """Sample r's next token from logits z [vocab]; emit text; decide whether it ends."""
        tok = self.llm.tokenizer
        req = r.req
        next_id = r.sampler(z, r.history)
        ev = Event()
        if tok.is_eog(next_id) and not req.ignore_eos:
            self._finish(r, FINISH_STOP)
            return
        r.generated.append(next_id)
        r.history.append(next_id)
        ev.token_ids = [next_id]
        if req.logprobs > 0:
            ev.logprobs = [self._logprobs(z, next_id, req.logprobs)]
        text, hit = r.stopper.push(r.decoder.add(next_id))
        ev.text = text
        with self._lock:
            self._metrics["generated_tokens_total"] += 1
        if hit:
            _safe_call(r.on_event, ev)
            self._finish(r, FINISH_STOP, flush_decoder=False)
            return
        if len(r.generated) >= req.max_tokens or len(r.slot.tokens) >= self.slot_context:
            _safe_call(r.on_event, ev)
            self._finish(r, FINISH_LENGTH)
            return
        r.next_id = next_id
        if ev.text or ev.token_ids:
            _safe_call(r.on_event, ev)

    def _logprobs(self, z: torch.Tensor, token_id: int, n: int) -> TokenLogprob:
        from ..sampling import top_logprobs

        tok = self.llm.tokenizer
        lp, top = top_logprobs(z, token_id, n)
        text = lambda t: tok.token_to_piece(int(t)).decode("utf-8", "replace")   # noqa: E731
        return TokenLogprob(token_id, text(token_id), float(lp), [(int(t), text(t), float(v)) for t, v in top])

    def _finish(self, r: _Running, reason: str, *, flush_decoder: bool = True, error: str | None = None) -> None:
        """End r: the rest of its text, the final event, its slot freed (its tokens kept)."""
        if r.finish is not None:
            return
        r.finish = reason
        tail = ""
        if reason != FINISH_ABORT:
            if flush_decoder:
                tail = r.stopper.push(r.decoder.flush())[0]
            tail += r.stopper.flush()
        usage = Usage(len(r.req.prompt_ids), len(r.generated), r.cached)
        _safe_call(r.on_event, Event(text=tail, finish_reason=reason, usage=usage, error=error))
        r.slot.owner = None
        r.slot.last_used = time.monotonic()
        if reason == FINISH_ERROR:
            with self._lock:
                self._metrics["requests_failed_total"] += 1

    def _abort_all(self, why: str) -> None:
        for r in list(self._running):
            self._finish(r, FINISH_ABORT)
        self._running = []
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for item in waiting:
            self._emit_final_unstarted(item, FINISH_ABORT)

    # ---- ranks ------------------------------------------------------------------------

    def _send(self, msg) -> None:
        """Rank 0: the step (or stop) to every other rank."""
        if self._comm is None:
            return
        for dst in range(1, self.world):
            self._comm.send(msg, dest=dst, tag=_STEP_TAG)

    def _follow(self) -> None:
        """Ranks > 0: run rank 0's steps until it says stop."""
        comm = self._comm
        last = time.monotonic()
        while True:
            if not comm.Iprobe(source=0, tag=_STEP_TAG):
                if time.monotonic() - last > _SPIN_S:
                    time.sleep(_IDLE_SLEEP_S)
                continue
            msg = comm.recv(source=0, tag=_STEP_TAG)
            if msg[0] == "stop":
                return
            _, copies, spans, tokens = msg
            self._execute(copies, [Span(*s) for s in spans], tokens)
            last = time.monotonic()


def _safe_call(fn, ev: Event) -> None:
    """Deliver an event; a broken consumer must not stop the engine."""
    try:
        fn(ev)
    except Exception:  # noqa: BLE001 - the HTTP side's problem, logged there
        pass
