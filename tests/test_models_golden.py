"""The two shipped models against llama.cpp golden data (tests/data, made by
scripts/make_golden.py with llama-cpp-python):

- teacher-forced: mean KL(llama.cpp || ours) <= 0.02 nats and top-1 agreement >= 98 %
  over the stored passage (>= 256 positions), and >= 98 % at every position where
  llama.cpp's favourite leads its runner-up by more than 0.3 nats;
- greedy: the first 16 tokens equal llama.cpp's on at least 7 of the 8 prompts, where a
  prompt whose first difference falls on a near tie of llama.cpp (its recorded top-2
  margin < golden.NEAR_TIE nats at that step) also counts as equal: there any change of
  numerics may flip the choice (llama.cpp with flash attention on parts from its own
  golden data at a 0.049-nat tie on gemma3-270m), and the continuation after a different
  token is no longer comparable.

The model is found through tp_numa.model_registry (fixtures in conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from golden import greedy_verdict, kl_and_top1, load_golden
from tp_numa.models import load_model

FIXTURE = {"qwen2.5-coder-0.5b": "qwen_path", "gemma3-270m": "gemma_path"}
GREEDY_TOKENS = 16
# Overall top-1 threshold. gemma3-270m is an exception: the passage has many near-ties
# and this model amplifies rounding differences, so llama.cpp itself does not reach 98 %
# against its own golden data once its numerics change slightly: the same llama.cpp
# build with flash attention on (vs off for the golden) gives KL 0.0060 and top-1
# 94.5 % (qwen: KL 0.0010, top-1 96.7 %). The bound for gemma is set just under
# llama.cpp's own agreement; confident positions must still agree >= 98 % (below).
TOP1_MIN = {"qwen2.5-coder-0.5b": 0.98, "gemma3-270m": 0.93}
CONFIDENT_GAP = 0.3     # nats between llama.cpp's top-1 and top-2


@pytest.fixture(scope="module", params=list(FIXTURE))
def loaded(request):
    name = request.param
    path = request.getfixturevalue(FIXTURE[name])
    model, cfg = load_model(path)
    return name, model, cfg, load_golden(name)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    model.setup_cache(len(prompt) + n + 1, torch.float16)
    logits = model(torch.tensor(prompt), 0, last_only=True)
    out = []
    for i in range(n):
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([nxt]), len(prompt) + i)
    return out


@pytest.mark.slow
def test_teacher_forced_matches_llama_cpp(loaded):
    name, model, cfg, g = loaded
    lp = g["logprobs"]
    ids = torch.tensor(lp["ids"], dtype=torch.long)
    assert len(ids) >= 256
    model.setup_cache(len(ids), torch.float16)
    logits = model(ids, 0)                                     # (T, vocab)
    kl, top1 = kl_and_top1(lp["topk_ids"], lp["topk_logprobs"], logits)
    print(f"{name}: mean KL {kl:.4f} nats, top-1 {top1:.3%} over {len(ids)} positions")
    assert kl <= 0.02, f"{name}: mean KL {kl:.4f}"
    assert top1 >= TOP1_MIN[name], f"{name}: top-1 agreement {top1:.3%}"
    gap = lp["topk_logprobs"][:, 0] - lp["topk_logprobs"][:, 1]
    confident = gap > CONFIDENT_GAP
    agree = logits.argmax(-1).numpy() == lp["topk_ids"][:, 0]
    assert confident.sum() >= 200
    assert agree[confident].mean() >= 0.98, f"{name}: top-1 {agree[confident].mean():.3%} at confident positions"


@pytest.mark.slow
def test_greedy_matches_llama_cpp(loaded):
    name, model, cfg, g = loaded
    eog = set(g["eog_ids"])
    good = 0
    report = []
    for case in g["greedy"]:
        want = case["ids"][:GREEDY_TOKENS]
        # llama.cpp's list does not stop at end-of-generation; compare up to the first one
        for i, t in enumerate(want):
            if t in eog:
                want = want[: i + 1]
                break
        got = _greedy(model, case["prompt_ids"], len(want))
        verdict, step = greedy_verdict(got, want, case["top2_margin"])
        good += verdict != "different"
        report.append((case["prompt"][:30], verdict, step))
    print(name, report)
    assert len(g["greedy"]) == 8
    assert good >= 7, f"{name}: {good}/8 prompts match llama.cpp's first {GREEDY_TOKENS} greedy tokens: {report}"
