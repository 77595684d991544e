"""Sampling chain: exact expectations on small hand-made logits (llama.cpp semantics)."""
import math

import pytest
import torch

from tp_numa.errors import TpNumaError
from tp_numa.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    apply_repetition_penalty,
    min_p_filter,
    top_k_filter,
    top_logprobs,
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
        (dict(presence_penalty=2.5), "--presence-penalty"),
        (dict(presence_penalty=math.nan), "--presence-penalty"),
        (dict(frequency_penalty=-2.01), "--frequency-penalty"),
    ],
)
def test_bad_options_name_the_option(kw, option):
    with pytest.raises(TpNumaError, match=option):
        Sampler(SamplingParams(**kw))


def test_frequency_and_presence_penalties_count_occurrences():
    z = torch.tensor([2.0, -1.0, 0.0, 4.0, -3.0])
    # id 1 three times, id 0 once, id 2 twice; 3 and 4 untouched
    out = apply_penalties(z, [0, 1, 2, 1, 1, 2], repeat=1.0, frequency=0.5, presence=0.25)
    assert out.tolist() == [2.0 - 0.5 - 0.25, -1.0 - 1.5 - 0.25, 0.0 - 1.0 - 0.25, 4.0, -3.0]
    assert z.tolist() == [2.0, -1.0, 0.0, 4.0, -3.0]  # input not modified
    # negative values make repeats more likely
    assert apply_penalties(z, [3], frequency=-1.0).tolist() == [2.0, -1.0, 0.0, 5.0, -3.0]


def test_penalties_apply_after_the_repetition_penalty():
    z = torch.tensor([2.0, -1.0, 3.0])
    # llama.cpp: z / r (or z * r) first, then the subtraction
    out = apply_penalties(z, [0, 1, 0], repeat=2.0, frequency=0.5, presence=1.0)
    assert out.tolist() == [2.0 / 2 - 1.0 - 1.0, -1.0 * 2 - 0.5 - 1.0, 3.0]


def test_zero_frequency_and_presence_leave_the_repeat_penalty_bitwise_alone():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, generator=g)
    recent = torch.randint(0, 1000, (64,), generator=g).tolist()
    a = apply_repetition_penalty(z, recent, 1.3)
    b = apply_penalties(z, recent, 1.3, 0.0, 0.0)
    assert torch.equal(a, b)
    draws = []
    for params in (SamplingParams(seed=5, repeat_penalty=1.3),
                   SamplingParams(seed=5, repeat_penalty=1.3, presence_penalty=0.0, frequency_penalty=0.0)):
        s = Sampler(params)
        draws.append([s(z, recent) for _ in range(20)])
    assert draws[0] == draws[1]


def test_presence_penalty_in_the_sampler_honours_the_window():
    z = torch.tensor([3.0, 2.9, 1.0])
    # token 0 was seen inside the window: presence 0.5 drops it below token 1
    assert Sampler(SamplingParams(temperature=0, presence_penalty=0.5, repeat_last_n=2))(z, [0, 2]) == 1
    # the same token outside the window is not penalised
    assert Sampler(SamplingParams(temperature=0, presence_penalty=0.5, repeat_last_n=1))(z, [0, 2]) == 0
    # repeat_last_n = 0 turns every penalty off
    assert Sampler(SamplingParams(temperature=0, frequency_penalty=2.0, repeat_last_n=0))(z, [0, 0]) == 0


def test_top_logprobs_is_log_softmax_of_the_raw_logits():
    z = torch.tensor([1.0, 3.0, 2.0, -1.0])
    expect = torch.log_softmax(z, dim=-1)
    lp, top = top_logprobs(z, 2, 3)
    assert lp == pytest.approx(float(expect[2]), abs=1e-6)
    assert [i for i, _ in top] == [1, 2, 0]
    assert [v for _, v in top] == pytest.approx([float(expect[i]) for i in (1, 2, 0)], abs=1e-6)
    assert math.isclose(sum(math.exp(v) for v in expect.tolist()), 1.0, rel_tol=1e-6)
    assert top_logprobs(z, 3, 0) == (pytest.approx(float(expect[3]), abs=1e-6), [])
    assert len(top_logprobs(z, 0, 10)[1]) == 4  # at most the vocabulary
    with pytest.raises(ValueError, match="token id 4"):
        top_logprobs(z, 4, 1)
