"""The golden data files are well formed, and kl_and_top1 computes what it documents."""
from __future__ import annotations

import numpy as np
import pytest

from golden import SHORT_NAMES, kl_and_top1, load_golden


def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _topk(lp, k):
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(lp, ids, axis=1)


@pytest.mark.parametrize("short", SHORT_NAMES)
def test_golden_files_are_complete(short):
    g = load_golden(short)
    assert g["meta"]["model"] == short and g["meta"]["llama_cpp_python"]
    assert len(g["texts"]) >= 30 and len(g["greedy"]) == 8
    assert all(len(x["ids"]) == 32 and x["prompt_ids"] for x in g["greedy"])
    lp = g["logprobs"]
    t, k = lp["topk_ids"].shape
    assert t == len(lp["ids"]) >= 300 and k == 64
    assert np.all(np.diff(lp["topk_logprobs"], axis=1) <= 0)  # most probable first
    mass = np.exp(lp["topk_logprobs"].astype(np.float64)).sum(axis=1)
    assert np.all(mass <= 1 + 1e-4) and np.median(mass) > 0.9
    assert np.all((lp["topk_ids"] >= 0) & (lp["topk_ids"] < g["meta"]["n_vocab"]))


def test_kl_is_zero_for_the_same_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 3000)) * 3
    ids, lps = _topk(_log_softmax(logits), 64)
    kl, top1 = kl_and_top1(ids, lps.astype(np.float32), logits + 7.0)  # shift: same softmax
    assert abs(kl) < 1e-6 and top1 == 1.0


def test_kl_is_a_tight_lower_bound_of_the_full_kl():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(50, 3000)) * 4
    ours = ref + rng.normal(size=ref.shape) * 0.3
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    full = np.mean((np.exp(lp) * (lp - lq)).sum(axis=1))
    ids, lps = _topk(lp, 64)
    kl, top1 = kl_and_top1(ids, lps, ours)
    assert 0 < kl <= full + 1e-9
    assert kl > 0.5 * full  # the rest bucket holds little mass here
    assert top1 == np.mean(np.argmax(ours, 1) == np.argmax(ref, 1))


def test_kl_counts_mass_moved_out_of_the_top_k():
    """Ours puts most mass on a token outside llama.cpp's top-k: the rest bucket shows it."""
    logits = np.zeros((1, 100))
    logits[0, :4] = [10, 9, 8, 7]
    ids, lps = _topk(_log_softmax(logits), 4)
    ours = logits.copy()
    ours[0, 50] = 20.0
    kl, top1 = kl_and_top1(ids, lps, ours)
    assert kl > 5 and top1 == 0.0
