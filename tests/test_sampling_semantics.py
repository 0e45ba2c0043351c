"""Sampling semantics through `LLM.generate`, as vLLM V1 defines them, on the tiny Llama.

References are independent of the engine: Hugging Face transformers on the same weights
(float32) for logits, logprobs and penalised greedy decoding, and the tokenizer for text.
Where a test needs a string or token that is sure to occur, it takes it from a first greedy
run and then checks what a second run with the stop condition does with it.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedllm import LLM, SamplingParams

PROMPT = "The capital of France is"
OTHER_PROMPTS = ["Hello, my name is", "def add(a, b):", "a", "Continuous batching lets new requests join"]
REPLACEMENT_CHAR = "\ufffd"


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def eos(tok) -> int:
    return tok.eos_token_id


def completion(llm, prompt, params: SamplingParams):
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


@torch.inference_mode()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is the raw log-softmax of the logits after ids[: i + 1]."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def greedy_reference(llm, prompt=PROMPT, max_tokens: int = 30):
    """A greedy run whose output text and tokens later runs are compared against."""
    return completion(llm, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


# ----- seeds, n ------------------------------------------------------------------------------
def test_seeded_request_is_reproducible_and_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = completion(llm, PROMPT, params).token_ids
    assert completion(llm, PROMPT, params).token_ids == alone
    # The same request in the middle of a batch of other random (seeded and unseeded) requests.
    others = [
        SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, max_tokens=8),
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=1.5, top_k=10, max_tokens=25, ignore_eos=True),
    ]
    prompts = OTHER_PROMPTS[:2] + [PROMPT] + OTHER_PROMPTS[2:]
    batch = llm.generate(prompts, others[:2] + [params] + others[2:], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    # The seed decides: another seed gives another completion.
    assert completion(llm, PROMPT, SamplingParams(temperature=1.0, seed=1235, max_tokens=16,
                                                  ignore_eos=True)).token_ids != alone


def test_seeded_request_survives_preemption_and_chunked_prefill(llama_dir):
    """A cramped engine (tiny KV cache, small token budget) must draw the same seeded tokens."""
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=40, ignore_eos=True) for i in range(6)]
    prompts = [f"{p} {i}" for i, p in enumerate(OTHER_PROMPTS + [PROMPT, PROMPT])]
    roomy = LLM(model=llama_dir, max_model_len=64)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    roomy.shutdown()
    cramped = LLM(model=llama_dir, max_model_len=64, num_gpu_blocks_override=8, block_size=8,
                  max_num_batched_tokens=16, max_num_seqs=4)
    got = [o.outputs[0].token_ids for o in cramped.generate(prompts, params, use_tqdm=False)]
    preemptions = cramped.llm_engine.engine_core.core.scheduler.num_preemptions
    cramped.shutdown()
    assert preemptions > 0  # the test is about that case
    assert got == expected


def test_n_gives_n_indexed_distinct_completions_reproducible_with_a_seed(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    ids = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(ids)) == 3 and all(len(i) == 12 for i in ids)
    seeded = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first = [c.token_ids for c in llm.generate(PROMPT, seeded, use_tqdm=False)[0].outputs]
    second = [c.token_ids for c in llm.generate(PROMPT, seeded, use_tqdm=False)[0].outputs]
    assert first == second and len({tuple(t) for t in first}) == 3


@pytest.mark.parametrize("kwargs", [dict(top_k=3), dict(top_p=0.2), dict(min_p=0.5), dict(top_k=2, top_p=0.1)])
def test_temperature_zero_is_greedy_whatever_the_truncation_knobs(llm, kwargs):
    plain = greedy_reference(llm, max_tokens=12).token_ids
    got = completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, **kwargs))
    assert got.token_ids == plain


# ----- stop strings, stop tokens, EOS, lengths --------------------------------------------------
def _pick_stop_string(tok, text: str, token_ids: list[int], spanning: bool) -> tuple[str, int, int]:
    """A 2-character ASCII stop string first occurring at char i, completed by token j.

    `spanning`: the string straddles a token boundary (the completing token alone lacks it).
    """
    for i in range(3, len(text) - 2):
        s = text[i : i + 2]
        if not (s.isascii() and s.isprintable() and s.strip() == s) or text.find(s) != i:
            continue
        j = next(j for j in range(len(token_ids)) if s in decode(tok, token_ids[: j + 1]))
        if (s not in decode(tok, token_ids[j : j + 1])) == spanning:
            return s, i, j
    raise LookupError(f"no suitable stop string in {text!r}")


@pytest.mark.parametrize("spanning", [False, True], ids=["within-a-token", "across-tokens"])
@pytest.mark.parametrize("include", [False, True], ids=["cut", "include_stop_str"])
def test_stop_string_cuts_text_and_keeps_the_completing_token(llm, tok, spanning, include):
    ref = greedy_reference(llm)
    stop, i, j = _pick_stop_string(tok, ref.text, ref.token_ids, spanning)
    out = completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop],
                                                 include_stop_str_in_output=include))
    assert out.text == (ref.text[: i + len(stop)] if include else ref.text[:i])
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == ref.token_ids[: j + 1]


def test_a_stop_string_completed_by_the_last_allowed_token_reports_stop(llm, tok):
    ref = greedy_reference(llm)
    stop, i, j = _pick_stop_string(tok, ref.text, ref.token_ids, spanning=True)
    out = completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=j + 1, ignore_eos=True, stop=stop))
    assert out.token_ids == ref.token_ids[: j + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == ref.text[:i]


def test_the_earliest_of_several_stop_strings_wins(llm, tok):
    ref = greedy_reference(llm)
    stop, i, j = _pick_stop_string(tok, ref.text, ref.token_ids, spanning=False)
    later = next(ref.text[k : k + 3] for k in range(i + 3, len(ref.text) - 3)
                 if ref.text[k : k + 3].isascii() and ref.text.find(ref.text[k : k + 3]) == k)
    out = completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                 stop=[later, stop]))
    assert out.stop_reason == stop and out.text == ref.text[:i]


def test_stop_strings_apply_to_each_completion_of_n(llm):
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=30, ignore_eos=True)
    refs = [c.text for c in llm.generate(PROMPT, params, use_tqdm=False)[0].outputs]
    assert refs[0] != refs[1]
    stops = [refs[0][3:5], refs[1][3:5]]  # one from each completion's text
    out = llm.generate(PROMPT, SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=30, ignore_eos=True,
                                              stop=stops), use_tqdm=False)[0]
    for ref, c in zip(refs, out.outputs):
        idx, stop = min((ref.find(s), s) for s in stops if s in ref)
        assert c.text == ref[:idx] and c.stop_reason == stop and c.finish_reason == "stop"


def _pick_stop_token(tok, token_ids: list[int], special: set[int]) -> int:
    """Index k >= 3 of a token seen for the first time, with clean text before and after it."""
    for k in range(3, len(token_ids)):
        t = token_ids[k]
        before, through = decode(tok, token_ids[:k]), decode(tok, token_ids[: k + 1])
        piece = through[len(before):]
        if (t not in token_ids[:k] and t not in special and not before.endswith(REPLACEMENT_CHAR)
                and through.startswith(before) and piece.strip() and piece.isprintable()
                and REPLACEMENT_CHAR not in piece):
            return k
    raise LookupError("no suitable stop token")


def test_stop_token_id_ends_generation_and_stays_in_token_ids_not_text(llm, tok):
    ref = greedy_reference(llm)
    k = _pick_stop_token(tok, ref.token_ids, set(tok.all_special_ids))
    stop_id = ref.token_ids[k]
    out = completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                 stop_token_ids=[stop_id]))
    assert out.token_ids == ref.token_ids[: k + 1]
    assert out.text == decode(tok, ref.token_ids[:k])
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_token_text_is_kept_with_include_stop_str_in_output(llm, tok):
    """vLLM's detokenizer only skips the stop token's text when include_stop_str_in_output is False."""
    ref = greedy_reference(llm)
    k = _pick_stop_token(tok, ref.token_ids, set(tok.all_special_ids))
    out = completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                 stop_token_ids=[ref.token_ids[k]], include_stop_str_in_output=True))
    assert out.token_ids == ref.token_ids[: k + 1]
    assert out.text == decode(tok, ref.token_ids[: k + 1])


@pytest.mark.parametrize("max_tokens", [10, 1])  # 1: EOS is also the last allowed token; stop wins
def test_eos_stops_with_no_stop_reason_and_stays_out_of_text(llm, eos, max_tokens):
    out = completion(llm, PROMPT, SamplingParams(temperature=1.0, max_tokens=max_tokens, logit_bias={eos: 100.0}))
    assert out.token_ids == [eos]
    assert out.text == "" and out.finish_reason == "stop" and out.stop_reason is None


def test_ignore_eos_generates_through_eos_up_to_max_tokens(llm, eos):
    out = completion(llm, PROMPT, SamplingParams(temperature=1.0, max_tokens=6, logit_bias={eos: 100.0},
                                                 ignore_eos=True))
    assert out.token_ids == [eos] * 6
    assert out.text == "" and out.finish_reason == "length" and out.stop_reason is None


@pytest.mark.parametrize("min_tokens", [1, 4])
def test_min_tokens_holds_back_a_forced_eos(llm, tok, eos, min_tokens):
    out = completion(llm, PROMPT, SamplingParams(temperature=1.0, seed=3, max_tokens=10, min_tokens=min_tokens,
                                                 logit_bias={eos: 100.0}))
    assert len(out.token_ids) == min_tokens + 1
    assert eos not in out.token_ids[:min_tokens] and out.token_ids[-1] == eos
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == decode(tok, out.token_ids[:-1]).rstrip(REPLACEMENT_CHAR)


def test_min_tokens_masks_eos_even_with_ignore_eos(llm, eos):
    """vLLM always adds EOS to all_stop_token_ids (which min_tokens masks); ignore_eos only stops it ending."""
    out = completion(llm, PROMPT, SamplingParams(temperature=1.0, seed=3, max_tokens=6, min_tokens=3,
                                                 ignore_eos=True, logit_bias={eos: 100.0}))
    assert eos not in out.token_ids[:3] and out.token_ids[3:] == [eos] * 3
    assert out.finish_reason == "length"


def test_min_tokens_holds_back_a_stop_token_id(llm):
    ref = greedy_reference(llm)
    first = ref.token_ids[0]
    out = completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                 stop_token_ids=[first], min_tokens=3))
    assert first not in out.token_ids[:3]
    assert out.finish_reason == "length" or (out.token_ids[-1] == first and out.stop_reason == first)
    assert len(out.token_ids) >= 4


def test_min_tokens_also_holds_back_stop_strings(llm, tok):
    """vLLM (PR #22014) only checks stop strings once more than min_tokens tokens exist."""
    ref = greedy_reference(llm, max_tokens=10)
    stop = ref.text[:2]  # completed by the first token or two, and never again
    if ref.text.count(stop) != 1 or len(decode(tok, ref.token_ids[:5])) < 3:
        raise LookupError(f"unsuitable reference text {ref.text!r}")
    out = completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[stop],
                                                 min_tokens=5))
    assert out.token_ids == ref.token_ids and out.finish_reason == "length"


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_gives_exactly_that_many_and_finish_length(llm, eos, max_tokens):
    out = completion(llm, PROMPT, SamplingParams(temperature=1.0, seed=9, max_tokens=max_tokens,
                                                 logit_bias={eos: -100.0}))
    assert len(out.token_ids) == max_tokens and eos not in out.token_ids
    assert out.finish_reason == "length" and out.stop_reason is None


def test_text_is_the_decoded_tokens_minus_a_final_stop_token(llm, tok, eos):
    """Over a batch of random requests, many ending on EOS: text == decode(ids without EOS).

    A trailing incomplete UTF-8 character is never emitted (vLLM holds it back too), so the
    reference drops a trailing replacement character.
    """
    prompts = [PROMPT] + OTHER_PROMPTS
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, logit_bias={eos: 3.0}) for s in range(5)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    finished_by_eos = 0
    for o in outs:
        c = o.outputs[0]
        ids = c.token_ids
        if c.finish_reason == "stop":
            assert ids[-1] == eos and eos not in ids[:-1]
            ids, finished_by_eos = ids[:-1], finished_by_eos + 1
        assert c.text == decode(tok, ids).rstrip(REPLACEMENT_CHAR)
    assert finished_by_eos >= 2


# ----- logprobs --------------------------------------------------------------------------------
def _rank_bounds(row: torch.Tensor, value: float, tol: float = 1e-4) -> tuple[int, int]:
    return int((row > value + tol).sum()) + 1, int((row > value - tol).sum()) + 1


def test_greedy_logprobs_equal_hf_log_softmax(llm, hf_model, tok):
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12, logprobs=4, ignore_eos=True),
                       use_tqdm=False)[0]
    c = out.outputs[0]
    ref = hf_logprobs(hf_model, out.prompt_token_ids + c.token_ids)[len(out.prompt_token_ids) - 1 : -1]
    assert c.token_ids == ref.argmax(-1).tolist()
    total = 0.0
    for token, entry, row in zip(c.token_ids, c.logprobs, ref):
        assert token in entry and len(entry) in (4, 5)
        assert math.isclose(entry[token].logprob, row[token].item(), abs_tol=1e-4)
        assert entry[token].rank == 1
        top_vals, top_ids = row.topk(4)
        for v, t in zip(top_vals.tolist(), top_ids.tolist()):
            assert math.isclose(entry[t].logprob, v, abs_tol=1e-4)
        total += entry[token].logprob
    assert math.isclose(c.cumulative_logprob, total, rel_tol=1e-6, abs_tol=1e-6)


def test_sampled_logprobs_are_raw_not_processed(llm, hf_model):
    """With temperature, top-k and penalties, logprobs are still the model's raw log-softmax."""
    params = SamplingParams(temperature=1.5, top_k=8, repetition_penalty=1.3, presence_penalty=0.5, seed=21,
                            max_tokens=12, ignore_eos=True, logprobs=3)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    c = out.outputs[0]
    ref = hf_logprobs(hf_model, out.prompt_token_ids + c.token_ids)[len(out.prompt_token_ids) - 1 : -1]
    assert len(c.logprobs) == len(c.token_ids) == 12
    assert any(entry[t].rank > 1 for t, entry in zip(c.token_ids, c.logprobs))  # it did sample
    total = 0.0
    for token, entry, row in zip(c.token_ids, c.logprobs, ref):
        assert token in entry and len(entry) in (3, 4)
        for t, lp in entry.items():
            assert math.isclose(lp.logprob, row[t].item(), abs_tol=1e-4)
            lo, hi = _rank_bounds(row, row[t].item())
            assert lo <= lp.rank <= hi
        assert set(row.topk(3).indices.tolist()) <= set(entry)
        total += entry[token].logprob
    assert math.isclose(c.cumulative_logprob, total, rel_tol=1e-6, abs_tol=1e-6)


def test_logprobs_zero_gives_only_the_sampled_token(llm):
    c = completion(llm, PROMPT, SamplingParams(temperature=1.0, seed=1, max_tokens=5, logprobs=0, ignore_eos=True))
    assert [list(e) for e in c.logprobs] == [[t] for t in c.token_ids]
    assert math.isclose(c.cumulative_logprob, sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)),
                        rel_tol=1e-6)


def test_no_logprobs_asked_means_none(llm):
    c = completion(llm, PROMPT, SamplingParams(max_tokens=3))
    assert c.logprobs is None and c.cumulative_logprob is None


def _check_prompt_logprobs(out, hf_model, k: int) -> None:
    ids = out.prompt_token_ids
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    ref = hf_logprobs(hf_model, ids)
    for p in range(1, len(ids)):
        entry, row, token = plp[p], ref[p - 1], ids[p]
        assert token in entry and len(entry) in (k, k + 1), p
        for t, lp in entry.items():
            assert math.isclose(lp.logprob, row[t].item(), abs_tol=1e-4), p
            lo, hi = _rank_bounds(row, row[t].item())
            assert lo <= lp.rank <= hi
        assert set(row.topk(k).indices.tolist()) <= set(entry)


LONG_PROMPT = "Continuous batching lets new requests join while others are still decoding. Prefix caching shares"


def test_prompt_logprobs_equal_hf_even_after_the_prompt_was_cached(llm, hf_model):
    # Run the prompt once so its blocks are in the prefix cache, then ask for its logprobs.
    llm.generate(LONG_PROMPT, SamplingParams(max_tokens=1), use_tqdm=False)
    out = llm.generate(LONG_PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=2), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) > 20
    _check_prompt_logprobs(out, hf_model, 2)


def test_prompt_logprobs_with_chunked_prefill_and_n(llama_dir, hf_model):
    chunked = LLM(model=llama_dir, max_model_len=128, max_num_batched_tokens=8)
    out = chunked.generate(LONG_PROMPT, SamplingParams(n=2, max_tokens=3, prompt_logprobs=3, temperature=1.0),
                           use_tqdm=False)[0]
    chunked.shutdown()
    assert len(out.outputs) == 2
    _check_prompt_logprobs(out, hf_model, 3)


def test_prompt_logprobs_of_a_one_token_prompt(llm):
    out = llm.generate({"prompt_token_ids": [5]}, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]


# ----- penalties and masks against transformers --------------------------------------------------
@torch.inference_mode()
def hf_penalised_greedy(model, prompt_ids: list[int], max_tokens: int, eos: int, repetition: float = 1.0,
                        frequency: float = 0.0, presence: float = 0.0) -> list[int]:
    """Greedy decoding on HF logits with vLLM's penalty rules, written out step by step."""
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([prompt_ids + out])).logits[0, -1].float().clone()
        for t in set(prompt_ids) | set(out):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out


def test_repetition_penalty_matches_hf_generate(llm, hf_model, eos):
    prompt_ids = llm.get_tokenizer().encode(OTHER_PROMPTS[0])
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        hf = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                               repetition_penalty=1.8, eos_token_id=eos, pad_token_id=eos)
    expected = hf[0, len(prompt_ids):].tolist()
    plain = hf_penalised_greedy(hf_model, prompt_ids, 24, eos)
    assert expected != plain  # the penalty changes this continuation
    got = completion(llm, {"prompt_token_ids": prompt_ids},
                     SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.8))
    assert got.token_ids == expected


@pytest.mark.parametrize(
    "penalties",
    [dict(frequency=1.5), dict(presence=2.0), dict(repetition=1.3, frequency=0.7, presence=0.4)],
    ids=["frequency", "presence", "all-three"],
)
def test_frequency_and_presence_penalties_match_a_manual_greedy_loop(llm, hf_model, eos, penalties):
    prompt_ids = llm.get_tokenizer().encode(OTHER_PROMPTS[0])
    expected = hf_penalised_greedy(hf_model, prompt_ids, 24, eos, **penalties)
    assert expected != hf_penalised_greedy(hf_model, prompt_ids, 24, eos)  # not vacuous
    params = SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=penalties.get("repetition", 1.0),
                            frequency_penalty=penalties.get("frequency", 0.0),
                            presence_penalty=penalties.get("presence", 0.0))
    assert completion(llm, {"prompt_token_ids": prompt_ids}, params).token_ids == expected


def test_allowed_token_ids_restrict_every_generated_token(llm, hf_model):
    allowed = [40, 77, 123, 200, 301, 350]
    out = llm.generate(PROMPT, SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=20, ignore_eos=True,
                                              allowed_token_ids=allowed), use_tqdm=False)[0]
    seen = {t for c in out.outputs for t in c.token_ids}
    assert seen <= set(allowed) and len(seen) >= 3
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=1, allowed_token_ids=allowed),
                          use_tqdm=False)[0]
    ref = hf_logprobs(hf_model, greedy.prompt_token_ids)[-1]
    assert greedy.outputs[0].token_ids == [allowed[int(ref[allowed].argmax())]]


def test_logit_bias_moves_the_greedy_choice(llm, hf_model):
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    row = hf_logprobs(hf_model, out.prompt_token_ids)[-1]
    second = int(row.topk(2).indices[1])
    gap = float(row.max() - row[second])
    biased = completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=1, logit_bias={second: gap + 0.5}))
    assert out.outputs[0].token_ids == [int(row.argmax())] and biased.token_ids == [second]


# ----- the sampled distribution end to end -------------------------------------------------------
N_E2E = 3000


def chi_square_critical(dof: int, z: float = 4.75) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty), z=4.75 ~ a 1e-6 false-alarm rate."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _first_token_counts(llm, params: SamplingParams) -> torch.Tensor:
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    vocab = llm.llm_engine.config.model_config.vocab_size
    return torch.bincount(torch.tensor([c.token_ids[0] for c in out.outputs]), minlength=vocab).double()


def _truncation_cases(probs: torch.Tensor):
    sorted_p, order = probs.sort(descending=True)
    cum = sorted_p.cumsum(0)
    top_p = float((cum[4] + cum[5]) / 2)  # a nucleus of 6 tokens, far from both boundaries
    min_p = float((sorted_p[2] + sorted_p[3]) / 2 / sorted_p[0])  # keeps 3 tokens
    return {
        "top_k": (dict(top_k=5), order[:5]),
        "top_p": (dict(top_p=top_p), order[:6]),
        "min_p": (dict(min_p=min_p), order[:3]),
    }


@pytest.mark.parametrize("case", ["T=0.7", "T=1.0", "top_k", "top_p", "min_p"])
def test_first_token_frequencies_follow_hf_softmax(llm, hf_model, case):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    logits = hf_model(torch.tensor([prompt_ids])).logits[0, -1].detach().float()
    if case.startswith("T="):
        temperature, extra = float(case[2:]), {}
        expected = torch.softmax(logits / temperature, -1).double()
    else:
        temperature = 0.9
        extra, support = _truncation_cases(torch.softmax(logits / temperature, -1))[case]
        expected = torch.zeros_like(logits, dtype=torch.float64)
        expected[support] = torch.softmax(logits / temperature, -1)[support].double()
        expected /= expected.sum()
    params = SamplingParams(n=N_E2E, temperature=temperature, seed=1000, max_tokens=1, **extra)
    counts = _first_token_counts(llm, params)
    assert counts[expected == 0].sum() == 0, "drew a token outside the allowed set"
    # Pool the rare tokens into one bin so every bin expects at least 5 draws.
    exp = expected * N_E2E
    big = exp >= 5
    obs_bins = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_bins = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp_bins > 0
    stat = float(((obs_bins[keep] - exp_bins[keep]) ** 2 / exp_bins[keep]).sum())
    dof = int(keep.sum()) - 1
    assert dof >= 2 and stat < chi_square_critical(dof), f"chi2={stat:.1f} with {dof} dof"
