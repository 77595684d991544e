"""Generation: the prefill/decode loop over a loaded model, and ``LLM``, the Python API.

Rank discipline (every rank runs this same code under ``mpirun``):

- rank 0 owns the tokenizer, the sampler and all output;
- per request rank 0 broadcasts the prompt ids (or an error every rank then raises);
- every rank runs the same forwards on its shards: the prompt in chunks of
  ``prefill_chunk`` tokens, then one token at a time;
- after each forward rank 0 samples and broadcasts ``[next_id, stop]``, so every rank
  runs exactly as many forwards as rank 0 asks for.

Positions: a prompt of ``P`` tokens fills positions ``0..P-1``; the ``i``-th generated
token (i = 0, 1, ...) is fed at position ``P + i``. The KV cache holds ``max_context``
positions, so at most ``max_context - P + 1`` tokens can be generated (the last one is
sampled but never fed), and a prompt longer than ``max_context`` is refused.
"""
from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import model_registry
from .distributed import communicator, parallel_state
from .errors import TpNumaError
from .memory import huge_page_bytes, thp_mode
from .layers.batch import SeqBatch
from .sampling import Sampler, SamplingParams
from .stop_strings import StopStringFilter

DEFAULT_MAX_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 256


def _log(msg: str) -> None:
    print(f"tp-numa: {msg}", file=sys.stderr, flush=True)


@dataclass
class GenerationStats:
    """Counters of the last request (filled on rank 0; zeros elsewhere)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0          # forwards of one token (generated_tokens - 1 at most)
    decode_seconds: float = 0.0
    stop_reason: str = ""          # "eog" | "stop string" | "max tokens" | "context full"
    token_ids: list[int] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tokens in {self.prompt_seconds:.2f} s "
            f"({self.prompt_tps:.2f} t/s), generation {self.generated_tokens} tokens, "
            f"{self.decode_steps} decode steps in {self.decode_seconds:.2f} s "
            f"({self.decode_tps:.2f} t/s), stop: {self.stop_reason}"
        )


class LLM:
    """A loaded GGUF model ready to generate; build it with ``LLM.load`` / ``tp_numa.load``.

    Attributes: ``model`` (the ``nn.Module`` tree, this rank's shards), ``config``
    (``tp_numa.config.ModelConfig``), ``tokenizer`` (rank 0 only, ``None`` elsewhere),
    ``path`` (the GGUF file), ``state`` (this rank's ``ParallelState``), ``max_context``,
    ``last_stats`` (``GenerationStats`` of the latest request).
    """

    def __init__(self, *, model, config, tokenizer, path: Path, state, max_context: int,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, quiet: bool = False):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.path = path
        self.state = state
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.quiet = quiet
        self.last_stats = GenerationStats()
        self._forward_has_last_only = "last_only" in inspect.signature(model.forward).parameters

    # ---- loading --------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        threads: int | None = None,
        max_context: int | None = None,
        offload: str | None = None,
        cache_type: str = "f16",
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        sequences: int = 1,
        quiet: bool = False,
        verbose: bool = False,
    ) -> "LLM":
        """Load ``model`` (a .gguf path or a short name, see ``tp_numa.model_registry``).

        - ``threads``: compute threads per rank (default: the cores of the rank's NUMA node);
        - ``max_context``: KV-cache positions (default ``min(trained context, 4096)``);
        - ``offload``: placement config file or preset name (see docs/offload.md), e.g.
          ``"attention-on-gpu"``; the resolved plan is printed before the weights load;
        - ``cache_type``: KV cache element type, ``"f16"`` (default), ``"bf16"``, ``"f32"`` or
          ``"q8_0"`` (GGUF Q8_0 blocks, 8.5 bits per value, CPU attention only);
        - ``prefill_chunk``: prompt tokens per forward;
        - ``sequences``: KV-cache sequences of ``max_context`` positions each (the slots of
          ``tp-numa serve``; ``generate`` and ``stream`` use sequence 0);
        - ``quiet``: nothing on stderr; ``verbose``: details of the load on stderr.

        Under ``mpirun`` every rank calls this with the same arguments.
        """
        if threads is not None and threads < 1:
            raise TpNumaError(f"--threads must be >= 1, got {threads}")
        if max_context is not None and max_context < 1:
            raise TpNumaError(f"--ctx-size must be >= 1, got {max_context}")
        if prefill_chunk < 1:
            raise TpNumaError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if sequences < 1:
            raise TpNumaError(f"--parallel (KV sequences) must be >= 1, got {sequences}")
        state = parallel_state.init()
        talk = state.is_main and not quiet
        t0 = time.perf_counter()
        _bind_rank(threads, verbose=verbose and talk)
        path = _resolve_on_ranks(str(model), state, quiet=not talk)
        if verbose and talk:
            _log(f"model file {path}")

        from .models import load_model  # imported late: pulls in the native ops

        plan = _placement_plan(offload, path, state, max_context, cache_type, talk=talk)
        net, config = load_model(str(path), state)
        ctx = max_context if max_context is not None else min(int(config.context_length), DEFAULT_MAX_CONTEXT)
        if ctx > int(config.context_length) and talk:
            _log(f"warning: --ctx-size {ctx} exceeds the trained context {config.context_length}")
        if plan is not None:
            from .offload import apply_placement

            moved = apply_placement(net, plan, state)
            if verbose and talk:
                layers = sum(1 for name in moved if not name.endswith(".attn"))
                _log(f"offloaded {layers} whole layers and {len(moved) - layers} attention cores")
        net.setup_cache(ctx, cache_type, n_seqs=sequences)

        tokenizer, err = None, ""
        if state.is_main:  # only rank 0 tokenizes; the others just agree it worked
            from .tokenizer import Tokenizer

            try:
                tokenizer = Tokenizer.from_gguf(path)
            except TpNumaError as e:
                err = str(e)
        parallel_state.check_all(not err, err)
        if verbose and talk:
            _log(
                f"loaded {config.arch}: {config.n_layers} layers, d_model {config.d_model}, "
                f"vocab {config.vocab_size}, tp={state.world_size}, threads/rank "
                f"{torch.get_num_threads()}, context {ctx}, in {time.perf_counter() - t0:.2f} s"
            )
            _log(f"memory: {huge_page_bytes() / 2**20:.0f} MiB of rank 0 on huge pages "
                 f"(transparent huge pages: {thp_mode() or 'unknown'}; TP_NUMA_HUGEPAGES=0 turns them off)")
        if verbose and config.moe is not None:
            from .layers import expert_balance

            expert_balance.set_counting(net, True)
        return cls(model=net, config=config, tokenizer=tokenizer, path=path, state=state,
                   max_context=ctx, prefill_chunk=prefill_chunk, quiet=quiet)

    def expert_balance(self) -> str | None:
        """For a MoE model loaded with ``verbose``: how evenly the ranks' expert work ran
        (``layers/expert_balance.py``). Collective: every rank calls it; the text on rank 0."""
        from .layers import expert_balance

        return expert_balance.report(self.model)

    # ---- tokens ---------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that tokenizes, samples and prints."""
        return self.state.is_main

    def prompt_ids(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids the model sees for ``prompt`` (rank 0 only).

        Raw text: tokenized with the model's BOS rule; special-token texts such as
        ``<|im_start|>`` become their tokens, as in llama.cpp's CLI.
        ``chat=True``: the GGUF chat template is applied to ``[system?, user]`` with the
        assistant turn opened, and the rendered text is tokenized with special tokens.
        """
        tok = self._require_tokenizer()
        if not chat:
            if system:
                raise TpNumaError("--system needs --chat (the system prompt goes through the chat template)")
            return list(tok.encode(prompt))
        messages = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        # Templates that start with the BOS text would give two BOS tokens once encode()
        # adds the model's own; llama.cpp strips the template's copy the same way.
        bos_text = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
        if tok.add_bos and bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
        return list(tok.encode(text, parse_special=True))

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise TpNumaError("the tokenizer lives on rank 0; call this on rank 0 only")
        return self.tokenizer

    # ---- generation -----------------------------------------------------------------

    def generate(self, prompt: str, max_tokens: int = 128, **kwargs) -> str:
        """Generate a continuation of ``prompt`` and return it (same options as ``stream``).

        Under ``mpirun`` call it on every rank; the text is returned on every rank.
        """
        text = "".join(self.stream(prompt, max_tokens, **kwargs))
        if self.state.world_size > 1:
            text = communicator.broadcast_object(text if self.is_main else None)
        return text

    def stream(
        self,
        prompt: str,
        max_tokens: int = 128,
        *,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: int | None = None,
        stop: Sequence[str] = (),
        chat: bool = False,
        system: str | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as tokens are produced.

        Sampling follows llama.cpp (see ``tp_numa.sampling``; ``temperature=0`` is greedy).
        Generation ends at an end-of-generation token (not shown), at the first
        occurrence of any ``stop`` string (the text before it is shown, the stop string is
        not), after ``max_tokens`` tokens, or when the context is full.
        Under ``mpirun`` every rank must iterate it; pieces are yielded on rank 0 only.
        """
        state = self.state
        header = None
        if state.is_main:
            try:
                if max_tokens < 0:
                    raise TpNumaError(f"--max-tokens must be >= 0, got {max_tokens}")
                params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                        repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
                sampler = Sampler(params)
                ids = self.prompt_ids(prompt, chat=chat, system=system)
                if not ids:
                    raise TpNumaError("the prompt is empty (no tokens); give some text with --prompt")
                if len(ids) > self.max_context:
                    raise TpNumaError(
                        f"the prompt has {len(ids)} tokens but the context holds {self.max_context}; "
                        f"shorten the prompt or raise --ctx-size (model trained for "
                        f"{self.config.context_length})"
                    )
                header = ("ok", ids)
            except TpNumaError as e:
                header = ("error", str(e))
        header = communicator.broadcast_object(header) if state.world_size > 1 else header
        if header[0] == "error":
            raise TpNumaError(header[1])
        ids = header[1]
        yield from self._run(ids, max_tokens, sampler if state.is_main else None, list(stop))

    def _run(self, ids: list[int], max_tokens: int, sampler: Sampler | None, stops: list[str]) -> Iterator[str]:
        """The loop itself; ``sampler`` is set on rank 0 only."""
        main = self.state.is_main
        multi = self.state.world_size > 1
        stats = GenerationStats(prompt_tokens=len(ids))
        self.last_stats = stats
        if max_tokens == 0:
            stats.stop_reason = "max tokens"
            return
        tok = self.tokenizer if main else None
        decoder = tok.stream_decoder() if main else None
        stopper = StopStringFilter(stops)
        history = list(ids)
        control = torch.zeros(2, dtype=torch.int64)  # [next id, stop flag]

        t0 = time.perf_counter()
        logits = None
        with torch.inference_mode():
            for start in range(0, len(ids), self.prefill_chunk):
                chunk = torch.tensor(ids[start:start + self.prefill_chunk], dtype=torch.long)
                # a prompt chunk, even of one token: the prefill kernels (layers/batch.py)
                logits = self._forward(chunk, SeqBatch.one(start, chunk.shape[0], prefill=True))
            stats.prompt_seconds = time.perf_counter() - t0
            pos = len(ids)
            while True:
                if main:
                    next_id = sampler(logits[-1], history)
                    stop = False
                    if tok.is_eog(next_id):
                        stats.stop_reason, stop = "eog", True
                    else:
                        stats.generated_tokens += 1
                        history.append(next_id)
                        stats.token_ids.append(next_id)
                        text, hit = stopper.push(decoder.add(next_id))
                        if text:
                            yield text
                        if hit:
                            stats.stop_reason, stop = "stop string", True
                        elif stats.generated_tokens >= max_tokens:
                            stats.stop_reason, stop = "max tokens", True
                        elif pos >= self.max_context:
                            stats.stop_reason, stop = "context full", True
                    control[0], control[1] = next_id, int(stop)
                if multi:
                    communicator.broadcast(control)
                if bool(control[1]):
                    break
                t1 = time.perf_counter()
                logits = self._forward(control[:1].clone(), pos)
                stats.decode_seconds += time.perf_counter() - t1
                stats.decode_steps += 1
                pos += 1
        if main:
            tail = stopper.push(decoder.flush())[0] if stats.stop_reason != "stop string" else ""
            tail += stopper.flush()
            if tail:
                yield tail
            if stats.stop_reason == "context full" and not self.quiet:
                _log(f"warning: the context ({self.max_context} positions) is full; generation stopped")
            if not self.quiet:
                _log(stats.summary())

    def _forward(self, tokens: torch.Tensor, start_pos):
        """One forward of ``tokens`` (T,) at ``start_pos`` (int or SeqBatch); rank 0 gets
        logits (T', vocab)."""
        if self._forward_has_last_only:
            return self.model.forward(tokens, start_pos, last_only=True)
        return self.model.forward(tokens, start_pos)


# ---- load helpers -------------------------------------------------------------------


def _bind_rank(threads: int | None, *, verbose: bool) -> None:
    """Pin this rank's threads and memory to its NUMA node before any weight is read."""
    try:
        from .distributed import numa
    except ImportError:
        numa = None
    if numa is not None and hasattr(numa, "setup_rank"):
        info = numa.setup_rank(threads)
        if verbose and info is not None:
            _log(f"binding: {info}")
    elif threads is not None:
        torch.set_num_threads(threads)


def _resolve_on_ranks(model: str, state, *, quiet: bool) -> Path:
    """Resolve the model on every rank; a short name is fetched by local rank 0 only.

    Local rank 0 of each host resolves first (it may pip-install and join the model);
    the other ranks of the host wait at the agreement step and then find the cache.
    Errors are agreed on, so every rank raises the same message (printed once).
    """
    if state.world_size == 1:
        return model_registry.resolve(model, quiet=quiet)
    path, err = None, ""
    first = state.local_rank == 0 or not model_registry.is_short_name(model)
    if first:
        try:
            path = model_registry.resolve(model, quiet=quiet)
        except TpNumaError as e:
            err = str(e)
    parallel_state.check_all(not err, err)
    if path is None:
        try:
            path = model_registry.resolve(model, quiet=True)
        except TpNumaError as e:
            err = str(e)
    parallel_state.check_all(not err, err)  # a collective: every rank calls it
    return path


def _placement_plan(offload: str | None, path: Path, state, max_context: int | None,
                    cache_type: str, *, talk: bool):
    """``--offload FILE|PRESET`` -> offload Plan, or None for all-CPU.

    The config is parsed and its GPUs checked before any weight is read; rank 0 prints
    the resolved plan (per-rank bytes per device) to stderr.
    """
    if offload is None:
        return None
    from . import offload as off

    placement = off.load_placement(offload)
    local_ranks = None
    if state.world_size > 1:
        local_ranks = parallel_state.mpi_comm().allgather(state.local_rank)
    # reads only the header and tensor infos; unmatched-rule warnings are part of the
    # printed plan, so they are not printed a second time here
    plan = off.plan_for_file(path, placement, state.world_size, max_seq_len=max_context,
                             kv_type=str(cache_type), local_ranks=local_ranks, warn=False)
    if talk:
        print(off.format_plan(plan), file=sys.stderr, flush=True)
    return plan
