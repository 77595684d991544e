"""Python API (``tp_numa.load`` -> ``LLM``) on the shipped models, against llama.cpp
golden data: greedy continuations, prompt tokenization, chat prompts, stop strings,
streaming, seeds, limits."""
from __future__ import annotations

import pytest
import torch

import tp_numa
from golden import greedy_verdict, load_golden
from tp_numa.errors import TpNumaError

MODELS = ("qwen2.5-coder-0.5b", "gemma3-270m")
N_GREEDY = 16  # tokens compared per golden prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=MODELS)
def loaded(request, model_path):
    llm = tp_numa.load(model_path(request.param), max_context=512, quiet=True)
    return request.param, llm, load_golden(request.param)


def until_eog(ids, eog_ids):
    """The golden ids do not stop at end-of-generation tokens; our generator does."""
    for i, t in enumerate(ids):
        if t in eog_ids:
            return ids[:i]
    return ids


def test_model_is_plain_modules(loaded):
    name, llm, _ = loaded
    assert isinstance(llm.model, torch.nn.Module)
    assert llm.config.arch == {"qwen2.5-coder-0.5b": "qwen2", "gemma3-270m": "gemma3"}[name]
    assert llm.is_main and llm.tokenizer is not None
    assert llm.max_context == 512


def test_greedy_equals_llama_cpp(loaded):
    """Issue 2: the first 16 greedy tokens equal llama.cpp's on >= 7 of 8 prompts; a
    prompt whose first difference is a llama.cpp near tie (golden.greedy_verdict) counts
    as equal. Matching prompts must also give llama.cpp's text."""
    name, llm, g = loaded
    eog = set(g["eog_ids"])
    good, report = 0, []
    for case in g["greedy"]:
        assert llm.prompt_ids(case["prompt"]) == case["prompt_ids"], case["prompt"]
        text = llm.generate(case["prompt"], N_GREEDY, temperature=0)
        ours = llm.last_stats.token_ids
        ref = until_eog(case["ids"][:N_GREEDY], eog)
        verdict, step = greedy_verdict(ours, ref, case["top2_margin"])
        if verdict == "equal":
            assert text == llm.tokenizer.decode(ref)
        good += verdict != "different"
        report.append((case["prompt"][:30], verdict, step))
    print(name, report)
    assert good >= 7, f"{name}: {good}/8 greedy continuations match; {report}"


def test_stream_pieces_join_to_generate(loaded):
    _, llm, g = loaded
    prompt = g["greedy"][1]["prompt"]
    pieces = list(llm.stream(prompt, 12, temperature=0))
    assert len(pieces) >= 2
    assert "".join(pieces) == llm.generate(prompt, 12, temperature=0)


def test_stop_string_cuts_before_it(loaded):
    _, llm, g = loaded
    case = g["greedy"][0]
    full = llm.generate(case["prompt"], N_GREEDY, temperature=0)
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    cut = full[: full.find(stop)]
    assert llm.generate(case["prompt"], N_GREEDY, temperature=0, stop=[stop]) == cut
    assert llm.last_stats.stop_reason == "stop string"


def test_seeded_sampling_is_reproducible(loaded):
    _, llm, g = loaded
    prompt = g["greedy"][2]["prompt"]
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, seed=1234)
    a = llm.generate(prompt, 8, **kw)
    b = llm.generate(prompt, 8, **kw)
    assert a == b and len(llm.last_stats.token_ids) > 0


def test_limits(loaded):
    _, llm, g = loaded
    assert llm.generate("Hello", 0) == ""
    with pytest.raises(TpNumaError, match=r"tokens but the context holds 512"):
        llm.generate("word " * 600, 4)
    # context nearly full: generation stops when it is
    n = len(llm.prompt_ids(g["greedy"][0]["prompt"]))
    small = tp_numa.load(llm.path, max_context=n + 2, quiet=True)
    small.generate(g["greedy"][0]["prompt"], 50, temperature=0)
    stats = small.last_stats
    assert stats.generated_tokens == 3 or stats.stop_reason == "eog"
    assert stats.stop_reason in ("context full", "eog")


def test_chat_prompt_uses_the_template(loaded):
    name, llm, g = loaded
    ids = llm.prompt_ids("Hello!", chat=True)
    tok = llm.tokenizer
    if name == "gemma3-270m":
        # no template in the GGUF: llama.cpp's built-in gemma template, one BOS
        ref = next(c["text"] for c in g["chat"] if c["template"] == "gemma"
                   and c["add_generation_prompt"] and c["messages"] == [{"role": "user", "content": "Hello!"}])
        assert ids == tok.encode(ref, parse_special=True)
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    else:
        ref = next(c["text"] for c in g["chat"] if c["template"] == "jinja"
                   and c["add_generation_prompt"] and c["messages"] == [{"role": "user", "content": "Hello!"}])
        assert ids == tok.encode(ref, parse_special=True)
    reply = llm.generate("Say hi.", 24, temperature=0, chat=True)
    assert reply.strip() and "<|im_start|>" not in reply and "<start_of_turn>" not in reply
