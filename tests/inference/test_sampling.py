"""Logits to a next token: temperature, top-k and top-p shape one distribution (`next_token_probs`),
greedy is its argmax, and a seed makes the draws repeat."""

import math

import pytest
import torch

from mtplab.errors import MtplabError
from mtplab.inference.sampling import SamplingParams, next_token_probs, sample

# probabilities 0.4, 0.25, 0.2, 0.1, 0.05: distinct, so that every filter has one right answer
PROBS = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
LOGITS = PROBS.log().unsqueeze(0)


def test_temperature_1_without_filters_is_the_softmax():
    probs = next_token_probs(LOGITS, SamplingParams(temperature=1.0))
    assert torch.allclose(probs, PROBS.unsqueeze(0))


def test_temperature_sharpens_and_flattens_as_a_power_of_the_probabilities():
    for temperature in (0.5, 2.0):
        want = PROBS ** (1 / temperature)
        got = next_token_probs(LOGITS, SamplingParams(temperature=temperature))
        assert torch.allclose(got[0], want / want.sum()), temperature


def test_temperature_0_is_a_one_hot_argmax_in_every_row():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.0, 4.5]])
    probs = next_token_probs(logits, SamplingParams())
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert sample(logits, SamplingParams()).tolist() == [1, 0]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k_keeps_exactly_the_k_likeliest_tokens_renormalised(k):
    probs = next_token_probs(LOGITS, SamplingParams(temperature=1.0, top_k=k))[0]
    assert torch.count_nonzero(probs) == k and torch.all(probs[:k] > 0)
    assert torch.allclose(probs[:k], PROBS[:k] / PROBS[:k].sum())


def test_top_k_at_or_above_the_vocabulary_changes_nothing():
    for k in (5, 50):
        assert torch.allclose(next_token_probs(LOGITS, SamplingParams(temperature=1.0, top_k=k)),
                              PROBS.unsqueeze(0))


@pytest.mark.parametrize("top_p,kept", [(0.39, 1), (0.41, 2), (0.64, 2), (0.66, 3), (0.84, 3), (0.86, 4),
                                        (0.99, 5)])
def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_p(top_p, kept):
    probs = next_token_probs(LOGITS, SamplingParams(temperature=1.0, top_p=top_p))[0]
    assert torch.count_nonzero(probs) == kept, probs
    assert PROBS[:kept].sum() >= top_p - 1e-6 and (kept == 1 or PROBS[:kept - 1].sum() < top_p)
    assert torch.allclose(probs[:kept], PROBS[:kept] / PROBS[:kept].sum())


def test_top_k_then_top_p_apply_in_that_order():
    # top-k 3 leaves 0.4, 0.25, 0.2 (renormalised: 0.47, 0.29, 0.24); top-p 0.7 then needs the first two
    probs = next_token_probs(LOGITS, SamplingParams(temperature=1.0, top_k=3, top_p=0.7))[0]
    assert torch.allclose(probs, torch.tensor([0.4, 0.25, 0, 0, 0]) / 0.65)


def test_padded_ids_at_minus_infinity_never_get_probability():
    logits = torch.tensor([[1.0, float("-inf"), 0.5, float("-inf")]])
    for params in (SamplingParams(), SamplingParams(temperature=1e-30), SamplingParams(temperature=1e30),
                   SamplingParams(temperature=1.0, top_p=0.999), SamplingParams(temperature=3.0, top_k=3)):
        probs = next_token_probs(logits, params)
        assert probs[0, 1] == 0 and probs[0, 3] == 0 and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)


def test_low_precision_logits_are_scored_in_float32_and_float64_stays():
    assert next_token_probs(LOGITS.bfloat16(), SamplingParams(temperature=1.0)).dtype == torch.float32
    assert next_token_probs(LOGITS.half(), SamplingParams(temperature=0.7, top_p=0.9)).dtype == torch.float32
    assert next_token_probs(LOGITS.double(), SamplingParams(temperature=1.0)).dtype == torch.float64


def test_a_seed_repeats_the_draws_and_another_seed_changes_them():
    logits = LOGITS.expand(64, -1)
    params = SamplingParams(temperature=1.0, seed=3)
    first = sample(logits, params, params.generator(torch.device("cpu")))
    again = sample(logits, params, params.generator(torch.device("cpu")))
    other = SamplingParams(temperature=1.0, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, sample(logits, other, other.generator(torch.device("cpu"))))
    assert SamplingParams(temperature=1.0).generator(torch.device("cpu")) is None  # unseeded: global RNG


def test_draws_follow_the_filtered_distribution():
    params = SamplingParams(temperature=1.0, top_k=3, seed=0)
    draws = sample(LOGITS.expand(20000, -1), params, params.generator(torch.device("cpu")))
    frequency = torch.bincount(draws, minlength=5).double() / len(draws)
    want = torch.tensor([0.4, 0.25, 0.2, 0, 0], dtype=torch.float64) / 0.85
    # 20,000 draws: each frequency's standard error is below 0.0036; 0.015 is over 4 of them
    assert frequency[3] == frequency[4] == 0 and torch.allclose(frequency, want, atol=0.015), frequency


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
    (dict(top_k=-1), "top_k must be >= 0, got -1"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
])
def test_bad_sampling_values_are_one_line_errors(kwargs, message):
    with pytest.raises(MtplabError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message


def test_top_k_and_top_p_filter_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = next_token_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(k2, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    cold = next_token_probs(logits, SamplingParams(temperature=0.5))  # p ** 2, renormalised
    assert torch.allclose(cold, torch.tensor([[0.25, 0.09, 0.0225, 0.0025]]) / 0.365)


def test_extreme_temperature_and_top_p_still_give_a_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    for params in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, top_p=1e-50)):
        probs = next_token_probs(logits, params)
        assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]])), params
    huge = next_token_probs(logits, SamplingParams(temperature=1e30))
    assert torch.allclose(huge, torch.full_like(huge, 0.25))
