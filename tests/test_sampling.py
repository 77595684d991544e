"""Sampling chain: exact expectations on small hand-made logits (llama.cpp semantics)."""
import math

import pytest
import torch

from tp_numa.errors import TpNumaError
from tp_numa.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)

NEG = -math.inf


def kept(z: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(z.tolist()) if v != NEG]


def test_repetition_penalty_divides_positive_multiplies_negative():
    z = torch.tensor([2.0, -1.0, 0.0, 4.0, -3.0])
    out = apply_repetition_penalty(z, [0, 1, 2, 1, 1], 2.0)
    # distinct ids 0, 1, 2 penalised once each, 3 and 4 untouched
    assert out.tolist() == [1.0, -2.0, 0.0, 4.0, -3.0]
    assert z.tolist() == [2.0, -1.0, 0.0, 4.0, -3.0]  # input not modified


def test_repetition_penalty_window_is_last_n():
    z = torch.tensor([3.0, 3.0, 3.0])
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=2))
    # history [0, 1, 2]: only 1 and 2 are in the window, so 0 wins
    assert s(z, [0, 1, 2]) == 0
    # window 3 covers everything: all equal after the penalty, first maximum wins
    s3 = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=3))
    assert s3(z, [0, 1, 2]) == 0
    s3b = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=3))
    assert s3b(torch.tensor([3.0, 3.0, 2.5]), [0, 1]) == 2


def test_greedy_is_first_argmax_and_ignores_filters():
    z = torch.tensor([0.5, 2.0, 2.0, -1.0])
    s = Sampler(SamplingParams(temperature=0.0, top_k=1, top_p=0.1, min_p=0.9))
    assert s(z) == 1
    assert Sampler(SamplingParams(temperature=-1.0))(z) == 1


def test_top_k():
    z = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(top_k_filter(z, 2)) == [1, 3]
    assert kept(top_k_filter(z, 0)) == [0, 1, 2, 3, 4]
    assert kept(top_k_filter(z, 9)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_token_that_crosses_p():
    # probabilities sorted: 0.5 (id 1), 0.25 (id 3), 0.15 (id 2), 0.1 (id 0); logits = log p
    z = torch.log(torch.tensor([0.1, 0.5, 0.15, 0.25]))
    assert kept(top_p_filter(z, 0.5)) == [1]          # 0.5 >= 0.5 already
    assert kept(top_p_filter(z, 0.6)) == [1, 3]       # 0.75 crosses 0.6
    assert kept(top_p_filter(z, 0.8)) == [1, 2, 3]    # 0.9 crosses 0.8
    assert kept(top_p_filter(z, 0.95)) == [0, 1, 2, 3]
    assert kept(top_p_filter(z, 1.0)) == [0, 1, 2, 3]
    assert top_p_filter(z, 0.6)[3] == z[3]            # kept logits are unchanged


def test_min_p_relative_to_max():
    z = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]))
    assert kept(min_p_filter(z, 0.2)) == [0, 1, 2]     # 0.1 >= 0.2*0.5
    assert kept(min_p_filter(z, 0.25)) == [0, 1]       # 0.1 <  0.25*0.5
    assert kept(min_p_filter(z, 0.0)) == [0, 1, 2, 3, 4]


def test_filters_compose_like_llama_cpp():
    # top-k 3 leaves {0,1,2}; top-p 0.7 over those (0.44, 0.39, 0.17) keeps {0,1}
    z = torch.log(torch.tensor([0.4, 0.35, 0.15, 0.1]))
    s = Sampler(SamplingParams(temperature=1.0, top_k=3, top_p=0.7, min_p=0.0, seed=1))
    draws = {s(z) for _ in range(200)}
    assert draws == {0, 1}
    # min-p 0.5 after that keeps only tokens with p >= 0.2
    s2 = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=1))
    assert {s2(z) for _ in range(200)} == {0, 1}


def test_seeded_draws_are_reproducible_and_follow_temperature():
    z = torch.tensor([1.0, 0.0, -1.0, 0.5])
    p = SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a = [Sampler(p)(z) for _ in range(1)]
    s1, s2 = Sampler(p), Sampler(p)
    seq1 = [s1(z) for _ in range(50)]
    seq2 = [s2(z) for _ in range(50)]
    assert seq1 == seq2 and seq1[0] == a[0]
    # the sample frequencies approach softmax(z / T)
    s = Sampler(SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=7))
    n = 20000
    counts = torch.bincount(torch.tensor([s(z) for _ in range(n)]), minlength=4).double() / n
    expect = torch.softmax(z.double() / 0.7, dim=0)
    assert torch.allclose(counts, expect, atol=0.015)


def test_low_temperature_tends_to_argmax():
    z = torch.tensor([1.0, 1.5, 0.2])
    s = Sampler(SamplingParams(temperature=1e-3, top_k=0, top_p=1.0, min_p=0.0, seed=3))
    assert {s(z) for _ in range(50)} == {1}


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
        (dict(min_p=-0.1), "--min-p"),
        (dict(repeat_penalty=0.0), "--repeat-penalty"),
        (dict(temperature=math.nan), "--temperature"),
        (dict(seed=-5), "--seed"),
        (dict(repeat_last_n=-1), "--repeat-last-n"),
    ],
)
def test_bad_options_name_the_option(kw, option):
    with pytest.raises(TpNumaError, match=option):
        Sampler(SamplingParams(**kw))
