"""`SamplingParams` checks its values once, with vLLM's defaults, ranges and error messages."""

from __future__ import annotations

import pytest

from pagedllm import SamplingParams


def test_defaults_are_vllms():
    p = SamplingParams()
    assert p.n == 1
    assert p.max_tokens == 16
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k in (0, -1)  # both spell "disabled" in vLLM
    assert p.min_p == 0.0
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False and p.min_tokens == 0
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.detokenize is True and p.skip_special_tokens is True
    assert p.include_stop_str_in_output is False
    assert p.logit_bias is None and p.allowed_token_ids is None
    assert not p.sampling_type_greedy


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", -3),
        ("temperature", -0.01),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("top_k", -2),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("presence_penalty", 2.01),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 2.01),
        ("frequency_penalty", -2.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("min_tokens", -1),
        ("logprobs", -2),  # -1 means "the whole vocabulary" in recent vLLM, so test below it
        ("prompt_logprobs", -2),
        ("stop", ""),
        ("stop", ["ok", ""]),
    ],
)
def test_invalid_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"\bmin_tokens\b"):
        SamplingParams(min_tokens=5, max_tokens=4)
    SamplingParams(min_tokens=4, max_tokens=4)  # equal is fine
    SamplingParams(min_tokens=100, max_tokens=None)  # no cap: the context length caps it


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(top_k=-1),
        dict(top_k=0),
        dict(top_k=1),
        dict(top_p=1.0),
        dict(top_p=1e-3),
        dict(min_p=0.0),
        dict(min_p=1.0),
        dict(temperature=0.0),
        dict(presence_penalty=2.0, frequency_penalty=-2.0),
        dict(presence_penalty=-2.0, frequency_penalty=2.0),
        dict(repetition_penalty=1e-3),
        dict(max_tokens=1),
        dict(max_tokens=None),
        dict(logprobs=0, prompt_logprobs=0),
        dict(stop=["\n", "###"], stop_token_ids=[3, 4]),
        dict(n=4, seed=0),
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize("disabled", [-1, 0])
def test_top_k_minus_one_and_zero_both_disable_it(disabled):
    p = SamplingParams(top_k=disabled)
    assert p.top_k in (0, -1) and p.top_k < 1


@pytest.mark.parametrize(
    "kwargs", [dict(top_k=5), dict(top_p=0.3), dict(min_p=0.5), dict(top_k=2, top_p=0.1, min_p=0.9)]
)
def test_temperature_zero_is_greedy_whatever_the_truncation_knobs(kwargs):
    p = SamplingParams(temperature=0.0, **kwargs)
    assert p.sampling_type_greedy
    # As in vLLM, the truncation knobs are switched off for a greedy request.
    assert p.top_p == 1.0 and p.top_k < 1 and p.min_p == 0.0


def test_positive_temperature_keeps_truncation_knobs():
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.3, min_p=0.1)
    assert not p.sampling_type_greedy
    assert (p.top_k, p.top_p, p.min_p) == (5, 0.3, 0.1)


def test_logit_bias_keys_are_token_ids():
    p = SamplingParams(logit_bias={"7": 2})  # JSON turns keys into strings
    assert p.logit_bias == {7: 2.0}
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"x": 1.0})


def test_empty_allowed_token_ids_is_rejected():
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


def test_vocabulary_checks_name_the_field():
    SamplingParams(allowed_token_ids=[0, 9], logit_bias={9: 1.0}).verify_vocab(10)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[3, 10]).verify_vocab(10)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).verify_vocab(10)


def test_clone_is_independent():
    p = SamplingParams(stop=["x"], stop_token_ids=[1], logit_bias={2: 1.0})
    q = p.clone()
    q.stop.append("y")
    q.stop_token_ids.append(5)
    q.logit_bias[3] = 1.0
    assert p.stop == ["x"] and p.stop_token_ids == [1] and p.logit_bias == {2: 1.0}
