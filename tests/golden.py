"""Load llama.cpp golden data (tests/data) and compare model outputs against it.

Formats are described in tests/data/README.md; the data is made by
scripts/make_golden.py. Tests import this module as ``from golden import ...`` (the tests
directory is on sys.path under pytest's default rootdir-relative import mode) or as
``tests.golden``.
"""
from __future__ import annotations

import json
import os

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SHORT_NAMES = ("qwen2.5-coder-0.5b", "gemma3-270m")
# MoE models derived from qwen2.5-coder-0.5b (scripts/make_moe_from_dense.py; golden data by
# scripts/make_moe_golden.py, without the tokenizer entries)
DERIVED_NAMES = ("qwen2moe-from-qwen2.5-coder-0.5b", "mixtral-from-qwen2.5-coder-0.5b")


def load_golden(short_name: str) -> dict:
    """Golden data of one model: the JSON document plus ``logprobs`` from the .npz.

    ``logprobs`` = {"ids": int32 [T] (teacher-forced token ids, BOS included when the
    model adds one), "topk_ids": int32 [T, K], "topk_logprobs": float32 [T, K],
    "text": str}; row t is llama.cpp's prediction for the token after ids[t], with K ids
    sorted by decreasing log-probability, normalised over the full vocabulary.
    """
    path = os.path.join(DATA_DIR, f"golden_{short_name}.json")
    if not os.path.exists(path):
        known = ", ".join(SHORT_NAMES + DERIVED_NAMES)
        raise FileNotFoundError(f"{path}: no golden data for '{short_name}' (known: {known}); make it with "
                                f"scripts/make_golden.py (the derived MoE models: scripts/make_moe_golden.py)")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    npz = os.path.join(DATA_DIR, f"golden_{short_name}_logprobs.npz")
    if os.path.exists(npz):
        with np.load(npz) as z:
            data["logprobs"] = {"ids": z["ids"], "topk_ids": z["topk_ids"],
                                "topk_logprobs": z["topk_logprobs"], "text": str(z["text"])}
    return data


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def kl_and_top1(ref_topk_ids, ref_topk_logprobs, our_logits) -> tuple[float, float]:
    """Mean KL(llama.cpp || ours) in nats and top-1 agreement over T positions.

    ref_topk_ids, ref_topk_logprobs: [T, K] from the golden data (P = llama.cpp);
    our_logits: [T, V] raw logits of our model for the same positions (Q = softmax).

    Only P's top-K probabilities are stored, so KL is computed over the partition of the
    vocabulary into the K stored tokens plus one bucket R holding everything else:

        KL_t = sum_{i in topK} p_i (log p_i - log q_i) + p_R (log p_R - log q_R),
        p_R = 1 - sum_{i in topK} p_i,   q_R = 1 - sum_{i in topK} q_i.

    By the log-sum inequality this coarse KL is <= the full KL, with equality when P and
    Q have the same shape inside R; with K = 64 p_R is typically < 1e-3, so the bound is
    tight. Top-1 agreement = fraction of positions where argmax(our_logits) equals
    llama.cpp's most probable token.
    """
    ids = _as_numpy(ref_topk_ids).astype(np.int64)
    p_log = _as_numpy(ref_topk_logprobs).astype(np.float64)
    logits = _as_numpy(our_logits).astype(np.float64)
    if ids.shape != p_log.shape or ids.ndim != 2:
        raise ValueError(f"ref_topk_ids {ids.shape} and ref_topk_logprobs {p_log.shape} must be equal [T, K]")
    if logits.ndim != 2 or logits.shape[0] != ids.shape[0]:
        raise ValueError(f"our_logits {logits.shape} must be [T={ids.shape[0]}, vocab]")
    m = logits.max(axis=1, keepdims=True)
    q_log_all = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    q_log = np.take_along_axis(q_log_all, ids, axis=1)
    p = np.exp(p_log)
    q = np.exp(q_log)
    kl = (p * (p_log - q_log)).sum(axis=1)
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_rest = np.clip(1.0 - q.sum(axis=1), 1e-300, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
    kl = kl + rest
    top1 = float(np.mean(np.argmax(logits, axis=1) == ids[:, 0]))
    return float(np.mean(kl)), top1


# llama.cpp's top-2 margin (nats) below which a differing greedy choice is a near tie:
# there any change of numerics may flip the choice (llama.cpp with flash attention on
# parts from its own golden data at a 0.049-nat tie on gemma3-270m), and the continuation
# after a different token is no longer comparable. Observed divergences: 0.02 - 0.20.
NEAR_TIE = 0.25


def greedy_verdict(got: list[int], want: list[int], margins: list[float],
                   near_tie: float = NEAR_TIE) -> tuple[str, int | None]:
    """Compare our greedy ids with llama.cpp's: ("equal", None), ("near-tie", step) when
    the first difference falls where llama.cpp's top-2 margin < near_tie, else
    ("different", step). A length difference counts as a difference at the shorter end."""
    n = min(len(got), len(want))
    first = next((i for i in range(n) if got[i] != want[i]), None)
    if first is None:
        if len(got) == len(want):
            return "equal", None
        first = n
    margin = margins[first] if first < len(margins) else float("inf")
    return ("near-tie" if margin < near_tie else "different"), first


def greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    """n greedy ids of a tp_numa model after prompt (f16 KV cache, as the golden runs)."""
    import torch

    model.setup_cache(len(prompt) + n + 1, torch.float16)
    logits = model(torch.tensor(prompt), 0, last_only=True)
    out = []
    for i in range(n):
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([nxt]), len(prompt) + i)
    return out


def greedy_report(g: dict, model, n_tokens: int) -> tuple[int, list]:
    """(prompts matching llama.cpp, [(prompt head, verdict, step)]) over the golden greedy
    cases, our ids from ``greedy_ids(model, ...)``; llama.cpp's list is cut at its first
    end-of-generation id (it does not stop there) and at ``n_tokens``."""
    eog = set(g["eog_ids"])
    good, report = 0, []
    for case in g["greedy"]:
        want = case["ids"][:n_tokens]
        for i, t in enumerate(want):
            if t in eog:
                want = want[: i + 1]
                break
        verdict, step = greedy_verdict(greedy_ids(model, case["prompt_ids"], len(want)), want, case["top2_margin"])
        good += verdict != "different"
        report.append((case["prompt"][:30], verdict, step))
    return good, report
