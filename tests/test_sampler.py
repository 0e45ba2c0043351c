"""The sampler on hand-made logits: every processor against a hand-computed expectation.

No model here: logits are written by hand, `SamplingMetadata` is built from
`SamplingParams` the way the model runner builds it, and the expected result is worked
out independently in each test (vLLM V1's semantics).
"""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm import SamplingParams
from pagedllm.scheduler_output import ScheduledRequest
from pagedllm.sample.metadata import build_sampling_metadata
from pagedllm.sample.sampler import Sampler, apply_min_p, apply_penalties, apply_processors, apply_top_k_top_p

NEG_INF = float("-inf")
CPU = torch.device("cpu")


def scheduled(params: SamplingParams, request_id: str = "r", prompt: list[int] = (0,),
              output: list[int] = ()) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=request_id, token_ids=[0], num_computed_tokens=0, block_ids=[0], sampling_params=params,
        prompt_token_ids=list(prompt), output_token_ids=list(output), sample=True,
    )


def metadata(params: list[SamplingParams], vocab_size: int, prompts=None, outputs=None, seeds_from_params=True):
    """Metadata for a batch, one row per params; seeded params get their own generator, as in the runner."""
    prompts = prompts or [[0]] * len(params)
    outputs = outputs or [[]] * len(params)
    reqs = [scheduled(p, str(i), pr, out) for i, (p, pr, out) in enumerate(zip(params, prompts, outputs))]
    generators = {
        r.request_id: torch.Generator().manual_seed(r.sampling_params.seed)
        for r in reqs
        if seeds_from_params and r.sampling_params.seed is not None
    }
    return build_sampling_metadata(reqs, generators, vocab_size, CPU)


def sample(logits: torch.Tensor, params: list[SamplingParams], seed: int = 0, **kw):
    meta = metadata(params, logits.shape[-1], **kw)
    return Sampler(torch.Generator().manual_seed(seed))(logits.clone(), meta)


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


# A distribution with clear gaps: probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled order).
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log() + 1.234  # any shift: softmax is the same
BY_RANK = [1, 3, 0, 2]  # token ids from most to least likely


# ----- top-k / top-p / min-p ------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k_keeps_exactly_the_k_best(k):
    out = apply_top_k_top_p(LOGITS[None].clone(), torch.tensor([k]), None)[0]
    assert kept(out) == set(BY_RANK[:k])
    # Surviving logits are untouched.
    assert torch.equal(out[BY_RANK[:k]], LOGITS[BY_RANK[:k]])


@pytest.mark.parametrize(
    "top_p, expected_count",
    [
        (0.3, 1),  # 0.5 already reaches it
        (0.5 - 1e-3, 1),
        (0.5 + 1e-3, 2),  # 0.5 < p: the 0.3 token crosses it and is kept
        (0.7, 2),
        (0.8 + 1e-3, 3),
        (0.9, 3),
        (0.95 + 1e-3, 4),
        (1.0, 4),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p_crossing_token_included(top_p, expected_count):
    out = apply_top_k_top_p(LOGITS[None].clone(), None, torch.tensor([top_p]))[0]
    assert kept(out) == set(BY_RANK[:expected_count])


def test_top_k_then_top_p_on_the_renormalised_rest():
    # top_k=2 leaves probabilities 0.5/0.8 = 0.625 and 0.375; top_p=0.6 then needs only the first.
    out = apply_top_k_top_p(LOGITS[None].clone(), torch.tensor([2]), torch.tensor([0.6]))[0]
    assert kept(out) == {BY_RANK[0]}
    # top_p=0.7 needs both survivors, and never more than top_k let through.
    out = apply_top_k_top_p(LOGITS[None].clone(), torch.tensor([2]), torch.tensor([0.7]))[0]
    assert kept(out) == set(BY_RANK[:2])


def test_top_k_and_top_p_are_per_row():
    logits = LOGITS.repeat(3, 1)
    vocab = logits.shape[-1]
    out = apply_top_k_top_p(logits.clone(), torch.tensor([1, 3, vocab]), torch.tensor([1.0, 1.0, 0.7]))
    assert [kept(r) for r in out] == [{BY_RANK[0]}, set(BY_RANK[:3]), set(BY_RANK[:2])]


@pytest.mark.parametrize(
    "min_p, expected_count",
    [(0.0, 4), (0.09, 4), (0.11, 3), (0.29, 3), (0.31, 2), (0.59, 2), (0.61, 1), (1.0, 1)],
)
def test_min_p_is_relative_to_the_top_tokens_probability(min_p, expected_count):
    # Threshold = min_p * 0.5: tokens with probability below it go.
    out = apply_min_p(LOGITS[None].clone(), torch.tensor([min_p]))[0]
    assert kept(out) == set(BY_RANK[:expected_count])


def test_min_p_applies_to_the_temperature_scaled_distribution():
    # At T=2 the probabilities flatten to ~ sqrt(p): 0.5,0.3,0.15,0.05 -> relative 1, .77, .55, .32.
    scaled = torch.softmax(LOGITS / 2.0, -1)
    rel = scaled / scaled.max()
    min_p = float((rel[BY_RANK[2]] + rel[BY_RANK[3]]) / 2)  # between the 3rd and 4th token
    assert 0.15 / 0.5 < min_p  # so at T=1 the 3rd token would be dropped
    draws = sample(LOGITS.repeat(4000, 1), [SamplingParams(temperature=2.0, min_p=min_p)] * 4000).sampled_token_ids
    assert set(draws.tolist()) == set(BY_RANK[:3])


# ----- penalties, bias, masks --------------------------------------------------------------------
def test_penalties_against_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0], [2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # same batch, no penalties: untouched
    ]
    meta = metadata(params, 6, prompts=[[0, 1], [0, 1, 2, 3, 4, 5]], outputs=[[2, 2, 3], [4]])
    out = apply_penalties(logits.clone(), meta)
    expected = torch.tensor([
        [
            2.0 / 2,  # prompt, positive: divided
            -1.0 * 2,  # prompt, negative: multiplied
            0.5 / 2 - 0.5 * 2 - 0.25,  # output twice: repetition, then 2 x frequency, presence
            -0.5 * 2 - 0.5 * 1 - 0.25,  # output once
            3.0,  # unseen
            1.0,
        ],
        [2.0, -1.0, 0.5, -0.5, 3.0, 1.0],
    ])
    torch.testing.assert_close(out, expected)


def test_frequency_and_presence_ignore_the_prompt():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    meta = metadata([SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)], 4,
                    prompts=[[0, 0, 0, 1]], outputs=[[1, 2, 2]])
    out = apply_penalties(logits.clone(), meta)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0 - 1.0 - 0.5, 1.0 - 2.0 - 0.5, 1.0]]))


def test_repetition_penalty_counts_a_token_once_however_often_it_repeats():
    logits = torch.tensor([[4.0, 4.0, -4.0]])
    meta = metadata([SamplingParams(repetition_penalty=2.0)], 3, prompts=[[0, 0, 0]], outputs=[[1, 2, 2, 2]])
    torch.testing.assert_close(apply_penalties(logits.clone(), meta), torch.tensor([[2.0, 2.0, -8.0]]))


def test_negative_penalties_reward_repetition():
    logits = torch.tensor([[1.0, 1.0]])
    meta = metadata([SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5, repetition_penalty=0.5)], 2,
                    prompts=[[1]], outputs=[[1, 1]])
    # token 1: 1.0 / 0.5 = 2.0, + 2 x 1.0, + 0.5
    torch.testing.assert_close(apply_penalties(logits.clone(), meta), torch.tensor([[1.0, 4.5]]))


def test_logit_bias_is_added_to_its_row_only():
    logits = torch.zeros(2, 5)
    meta = metadata([SamplingParams(logit_bias={1: 2.5, 4: -3.0}), SamplingParams(logit_bias={0: 1.0})], 5)
    out = apply_processors(logits.clone(), meta)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.5, 0.0, 0.0, -3.0], [1.0, 0.0, 0.0, 0.0, 0.0]]))


def test_allowed_token_ids_mask_everything_else():
    logits = torch.arange(6, dtype=torch.float32).repeat(2, 1)
    meta = metadata([SamplingParams(allowed_token_ids=[0, 2]), SamplingParams()], 6)
    out = apply_processors(logits.clone(), meta)
    assert kept(out[0]) == {0, 2} and kept(out[1]) == set(range(6))
    assert torch.equal(out[0, [0, 2]], logits[0, [0, 2]])


def test_allowed_token_ids_bound_random_sampling_and_greedy():
    logits = torch.zeros(2000, 10)
    logits[:, 9] = 5.0  # the best token is not allowed
    draws = sample(logits, [SamplingParams(temperature=1.0, allowed_token_ids=[1, 4, 7])] * 2000).sampled_token_ids
    assert set(draws.tolist()) == {1, 4, 7}
    logits[0, 4] = 1.0
    greedy = sample(logits[:1], [SamplingParams(temperature=0.0, allowed_token_ids=[1, 4, 7])])
    assert greedy.sampled_token_ids.tolist() == [4]


def _with_stops(params: SamplingParams, eos: int) -> SamplingParams:
    params.all_stop_token_ids |= {eos}  # what the engine adds for EOS
    return params


def test_min_tokens_masks_stop_ids_until_reached():
    eos, stop_id = 0, 3
    logits = torch.zeros(3, 6)
    logits[:, [eos, stop_id]] = 10.0  # EOS and the stop id are by far the most likely
    mk = lambda: _with_stops(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop_id]), eos)
    meta = metadata([mk(), mk(), mk()], 6, outputs=[[], [5, 5], [5, 5, 5]])
    out = apply_processors(logits.clone(), meta)
    for row in (0, 1):  # fewer than min_tokens generated: both stop ids forbidden
        assert kept(out[row]) == {1, 2, 4, 5}
    assert kept(out[2]) == set(range(6))  # min_tokens reached: nothing masked
    result = Sampler(torch.Generator())(logits.clone(), meta)
    assert result.sampled_token_ids[:2].tolist() != [eos, eos]
    assert result.sampled_token_ids[2].item() in (eos, stop_id)


def test_greedy_is_the_argmax_after_penalties_and_bias():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0),  # 3 -> 1.5 < 2: token 1
        SamplingParams(temperature=0.0, logit_bias={3: 3.5}),  # 0 + 3.5 > 3: token 3
        SamplingParams(temperature=0.0, presence_penalty=1.5),  # 3 - 1.5 < 2: token 1
    ]
    out = sample(logits, params, prompts=[[0], [1], [2]], outputs=[[], [], [0]])
    assert out.sampled_token_ids.tolist() == [1, 3, 1]


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(top_k=1), dict(top_k=3, top_p=0.2), dict(top_p=0.01, min_p=0.9)]
)
def test_temperature_zero_rows_take_the_argmax_in_a_mixed_batch(kwargs):
    torch.manual_seed(1)
    logits = torch.randn(8, 50) * 3
    params = [SamplingParams(temperature=0.0, **kwargs) if i % 2 == 0 else SamplingParams(temperature=1.5)
              for i in range(8)]
    out = sample(logits, params).sampled_token_ids
    assert out[0::2].tolist() == logits[0::2].argmax(-1).tolist()


# ----- logprobs --------------------------------------------------------------------------------
def test_logprobs_are_the_raw_log_softmax_before_any_processing():
    torch.manual_seed(2)
    logits = torch.randn(3, 40) * 2
    params = [
        SamplingParams(temperature=0.3, top_k=3, repetition_penalty=1.8, logit_bias={7: 4.0}, logprobs=5, seed=11),
        SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=2),
        SamplingParams(temperature=1.7, top_p=0.5, min_p=0.2, logprobs=0, seed=12),
    ]
    out = sample(logits, params, prompts=[[1, 2, 3], [4], [5]], outputs=[[7], [int(logits[1].argmax())], []])
    raw = torch.log_softmax(logits, -1)
    k = 5  # the batch's largest request
    assert out.logprob_token_ids.shape == (3, k + 1)
    for row in range(3):
        chosen = int(out.sampled_token_ids[row])
        assert out.logprob_token_ids[row, 0] == chosen
        assert math.isclose(out.logprobs[row, 0].item(), raw[row, chosen].item(), abs_tol=1e-6)
        top_vals, top_ids = raw[row].topk(k)
        assert out.logprob_token_ids[row, 1:].tolist() == top_ids.tolist()
        torch.testing.assert_close(out.logprobs[row, 1:], top_vals)
        assert out.ranks[row, 1:].tolist() == list(range(1, k + 1))
    # The greedy row's penalty moved it off the raw argmax, so its raw rank is above 1.
    assert out.ranks[1, 0].item() > 1


def test_rank_is_one_plus_the_number_of_strictly_larger_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]] * 5)
    params = [SamplingParams(temperature=0.0, allowed_token_ids=[t], logprobs=1) for t in range(5)]
    out = sample(logits, params)
    assert out.sampled_token_ids.tolist() == [0, 1, 2, 3, 4]
    assert out.ranks[:, 0].tolist() == [4, 1, 3, 2, 5]


def test_no_logprobs_requested_means_none_computed():
    out = sample(torch.randn(2, 10), [SamplingParams(), SamplingParams(temperature=0.0)])
    assert out.logprobs is None and out.logprob_token_ids is None and out.ranks is None


# ----- seeds -----------------------------------------------------------------------------------
def test_seeded_rows_are_reproducible_whatever_else_is_in_the_batch():
    vocab, steps = 64, 30
    logits = torch.zeros(1, vocab)  # flat: every draw is decided by the noise alone

    def draws(batch: list[SamplingParams], row: int, seed: int) -> list[int]:
        meta_gens: dict[str, torch.Generator] = {}
        sampler = Sampler(torch.Generator().manual_seed(seed))
        reqs = [scheduled(p, str(i)) for i, p in enumerate(batch)]
        for r in reqs:
            if r.sampling_params.seed is not None:
                meta_gens[r.request_id] = torch.Generator().manual_seed(r.sampling_params.seed)
        out = []
        for _ in range(steps):  # generators keep their state across steps, as in the runner
            meta = build_sampling_metadata(reqs, meta_gens, vocab, CPU)
            out.append(int(sampler(logits.repeat(len(batch), 1), meta).sampled_token_ids[row]))
        return out

    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = draws([seeded], 0, seed=0)
    assert draws([seeded], 0, seed=99) == alone  # the engine's own generator does not matter
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=0.0)]
    assert draws(others[:2] + [seeded] + others[2:], 2, seed=5) == alone
    assert draws([seeded] + others, 0, seed=6) == alone
    assert len(set(alone)) > 10  # genuinely random, not a constant
    assert draws([SamplingParams(temperature=1.0, seed=1235)], 0, seed=0) != alone


def test_unseeded_rows_follow_the_engine_generator():
    logits = torch.zeros(50, 64)
    a = sample(logits, [SamplingParams()] * 50, seed=3).sampled_token_ids
    b = sample(logits, [SamplingParams()] * 50, seed=3).sampled_token_ids
    c = sample(logits, [SamplingParams()] * 50, seed=4).sampled_token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----- statistics ------------------------------------------------------------------------------
def chi_square_critical(dof: int, z: float = 4.75) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty), z=4.75 ~ a 1e-6 false-alarm rate."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_matches_distribution(draws: torch.Tensor, expected: torch.Tensor) -> None:
    """Tokens outside the support never appear; the counts pass a chi-square test."""
    n = draws.numel()
    counts = torch.bincount(draws, minlength=expected.numel()).double()
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {torch.nonzero(counts * ~support)}"
    exp = expected[support].double() * n
    stat = float(((counts[support] - exp) ** 2 / exp).sum())
    dof = int(support.sum()) - 1
    if dof > 0:
        assert stat < chi_square_critical(dof), f"chi2={stat:.1f} with {dof} dof"


N_DRAWS = 20000
STAT_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.5])


def _restricted(probs: torch.Tensor, keep: list[int]) -> torch.Tensor:
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_frequencies_follow_softmax_at_temperature(temperature):
    params = [SamplingParams(temperature=temperature)] * N_DRAWS
    draws = sample(STAT_LOGITS.repeat(N_DRAWS, 1), params, seed=int(temperature * 10)).sampled_token_ids
    assert_matches_distribution(draws, torch.softmax(STAT_LOGITS / temperature, -1))


def test_sampling_frequencies_with_top_k_are_renormalised_over_the_k_best():
    params = [SamplingParams(temperature=0.8, top_k=3)] * N_DRAWS
    draws = sample(STAT_LOGITS.repeat(N_DRAWS, 1), params, seed=1).sampled_token_ids
    assert_matches_distribution(draws, _restricted(torch.softmax(STAT_LOGITS / 0.8, -1), [0, 1, 2]))


def test_sampling_frequencies_with_top_p_are_renormalised_over_the_nucleus():
    probs = torch.softmax(STAT_LOGITS / 1.2, -1)
    cum = probs.cumsum(-1)  # STAT_LOGITS is sorted, so this is the nucleus mass by size
    top_p = float((cum[2] + cum[3]) / 2)  # needs 4 tokens, far from either boundary
    params = [SamplingParams(temperature=1.2, top_p=top_p)] * N_DRAWS
    draws = sample(STAT_LOGITS.repeat(N_DRAWS, 1), params, seed=2).sampled_token_ids
    assert_matches_distribution(draws, _restricted(probs, [0, 1, 2, 3]))


def test_sampling_frequencies_with_min_p():
    probs = torch.softmax(STAT_LOGITS, -1)
    min_p = float((probs[2] + probs[3]) / 2 / probs[0])
    params = [SamplingParams(temperature=1.0, min_p=min_p)] * N_DRAWS
    draws = sample(STAT_LOGITS.repeat(N_DRAWS, 1), params, seed=3).sampled_token_ids
    assert_matches_distribution(draws, _restricted(probs, [0, 1, 2]))


def test_seeded_rows_follow_the_same_distribution():
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(N_DRAWS // 4)]
    draws = sample(STAT_LOGITS.repeat(len(params), 1), params).sampled_token_ids
    assert_matches_distribution(draws, torch.softmax(STAT_LOGITS, -1))


def test_chi_square_check_can_fail():
    """The statistical checks above are not vacuous: a wrong temperature is caught."""
    draws = sample(STAT_LOGITS.repeat(N_DRAWS, 1), [SamplingParams(temperature=1.0)] * N_DRAWS, seed=4)
    with pytest.raises(AssertionError, match="chi2"):
        assert_matches_distribution(draws.sampled_token_ids, torch.softmax(STAT_LOGITS / 1.1, -1))
