"""A forward of several sequences at once (``SeqBatch``: prompt chunks and decode rows of
different KV sequences in one [T, d] matrix) gives every sequence bitwise the logits it gets
alone, on synthetic models of every architecture (sliding-window rings that wrap, q/k
norms, sandwich norms, MoE), through the module path and the native decode step."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from synthetic_gguf import Spec, gemma3_spec, write_model
from synthetic_moe import moe_spec, write_moe_model
from tp_numa.errors import TpNumaError
from tp_numa.layers import native_decode
from tp_numa.layers.batch import SeqBatch, Span
from tp_numa.models import load_model

SPECS = {
    "llama": lambda p: write_model(p, Spec(arch="llama", seed=3)),
    "qwen2": lambda p: write_model(p, Spec(arch="qwen2", seed=1)),
    "qwen3": lambda p: write_model(p, Spec(arch="qwen3", seed=2, down_type=QT.Q8_0, n_heads=8, n_kv=4)),
    "gemma3": lambda p: write_model(p, gemma3_spec(seed=4, n_layers=6)),      # window 4: the rings wrap
    "qwen3moe": lambda p: write_moe_model(p, moe_spec("qwen3moe")),
}

# three sequences of different lengths (token ids < every synthetic vocab)
SEQS = [[5, 17, 3, 250, 42, 42, 7, 300, 1, 99, 128, 64],
        [9, 11, 200, 13, 4, 4, 81],
        [77, 1, 2, 3, 150, 160, 170, 180, 190, 33]]


def _alone(model, seq: int, tokens: list[int], prefill: int) -> list[torch.Tensor]:
    """Logits after each position from `prefill - 1` on, sequence `seq` run by itself."""
    ids = torch.tensor(tokens)
    out = [model(ids[:prefill], SeqBatch.one(0, prefill, seq), last_only=True)[0]]
    for t in range(prefill, len(tokens)):
        out.append(model(ids[t:t + 1], SeqBatch.one(t, 1, seq))[0])
    return out


def _batched(model, prefill: list[int]) -> dict[int, list[torch.Tensor]]:
    """The three sequences interleaved like the server does: sequence 1's prompt in two
    chunks beside sequence 0's decode rows, sequence 2 joining later, then decode rows of
    all of them in one step each."""
    fed = [0, 0, 0]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    first = [
        [(0, prefill[0]), (1, 3)],                       # prompt of 0, first chunk of 1
        [(0, 1), (1, prefill[1] - 3)],                   # decode 0, rest of 1's prompt
        [(1, 1), (0, 1), (2, prefill[2])],               # decode 1 and 0, prompt of 2
    ]
    while any(fed[s] < len(SEQS[s]) for s in range(3)):
        step = first.pop(0) if first else [(s, 1) for s in (2, 0, 1)]     # then decode rows of all
        spans, toks = [], []
        for s, n in step:
            if fed[s] >= len(SEQS[s]):
                continue
            n = min(n, len(SEQS[s]) - fed[s])
            spans.append(Span(s, fed[s], n))
            toks += SEQS[s][fed[s]:fed[s] + n]
        logits = model(torch.tensor(toks), SeqBatch(spans), last_only=True)
        for j, sp in enumerate(spans):
            fed[sp.seq] += sp.length
            if fed[sp.seq] >= prefill[sp.seq]:
                got[sp.seq].append(logits[j])
    return got


@pytest.mark.parametrize("native", [False, True], ids=["modules", "native"])
@pytest.mark.parametrize("arch", list(SPECS))
def test_batched_sequences_match_each_alone(tmp_path, arch, native):
    model, _ = load_model(SPECS[arch](tmp_path / f"{arch}.gguf"))
    prefill = [4, 5, 3]
    native_decode.set_enabled(native)
    try:
        model.setup_cache(32, "f16", n_seqs=3)
        alone = {s: _alone(model, s, SEQS[s], prefill[s]) for s in range(3)}
        model.setup_cache(32, "f16", n_seqs=3)
        got = _batched(model, prefill)
    finally:
        native_decode.set_enabled(True)
    for s in range(3):
        assert len(got[s]) == len(alone[s])
        for i, (a, b) in enumerate(zip(alone[s], got[s])):
            assert torch.equal(a, b), f"sequence {s} position {prefill[s] - 1 + i}: {(a - b).abs().max()}"


def test_int_position_is_sequence_zero(tmp_path):
    model, _ = load_model(SPECS["llama"](tmp_path / "l.gguf"))
    model.setup_cache(16, "f16", n_seqs=2)
    ids = torch.tensor(SEQS[0][:6])
    a = model(ids, 0)
    model.setup_cache(16, "f16", n_seqs=2)
    b = model(ids, SeqBatch.one(0, 6, 0))
    assert torch.equal(a, b)


def test_bad_batches_raise(tmp_path):
    model, _ = load_model(SPECS["llama"](tmp_path / "l.gguf"))
    model.setup_cache(16, "f16", n_seqs=2)
    with pytest.raises(TpNumaError, match="sequence 2 does not exist"):
        model(torch.tensor([1]), SeqBatch.one(0, 1, seq=2))
    with pytest.raises(TpNumaError, match="names a sequence twice"):
        SeqBatch([Span(0, 0, 1), Span(0, 1, 1)])
    with pytest.raises(TpNumaError, match="exceed the context size"):
        model(torch.tensor([1, 2]), SeqBatch([Span(0, 0, 1), Span(1, 16, 1)]))
    with pytest.raises(ValueError, match="tokens for a batch"):
        model(torch.tensor([1, 2, 3]), SeqBatch([Span(0, 0, 1), Span(1, 0, 1)]))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prompt_chunks_of_one_token_match_one_prefill(tmp_path, arch):
    """A prompt read in chunks (some of one token, as when a reused prefix leaves only the
    last prompt token) gives bitwise the logits of one prefill: prompt spans always use
    the prefill kernels."""
    model, _ = load_model(SPECS[arch](tmp_path / f"{arch}.gguf"))
    ids = torch.tensor(SEQS[0])
    model.setup_cache(32, "f16")
    whole = model(ids, SeqBatch.one(0, len(ids), prefill=True), last_only=True)
    model.setup_cache(32, "f16")
    for a, b in [(0, 5), (5, 6), (6, 11), (11, 12)]:
        last = model(ids[a:b], SeqBatch.one(a, b - a, prefill=True), last_only=True)
    assert torch.equal(whole, last)
