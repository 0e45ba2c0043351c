"""Speculative decoding (method "ngram") changes how fast tokens come, never which tokens come.

Greedy runs are compared token for token with the same engine without `speculative_config`, through the
paged machinery (chunked prefill, preemption, prefix caching, n > 1, batches mixing drafted and plain
requests, stops inside accepted runs, penalties, logprobs, grammars, LoRA). Two tiny checkpoints cover the
two ways a draft can go: the random Llama of conftest writes text that never repeats, so nearly every draft
is rejected (the K/V written at rejected positions must never be read), and `loopy` (the same Llama with
its attention output zeroed, so each token is a function of the one before) falls into a cycle that n-gram
drafts predict, so long runs are accepted. Sampling is compared in distribution: the rejection sampler
alone against the exact target probabilities, and the engine with and without speculation by a
chi-square test over many seeded requests at temperature 1 with top-p.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from pagedllm import LLM, SamplingParams
from spec_decode_utils import assert_all_blocks_free, default_model_under_pressure, metric, token_ids
from pagedllm.config import SchedulerConfig, SpeculativeConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.request import Request
from pagedllm.sample.metadata import build_sampling_metadata
from pagedllm.sample.sampler import random_sampling_probs
from pagedllm.scheduler_output import ModelRunnerOutput, ScheduledRequest
from pagedllm.spec_decode.ngram_proposer import NgramProposer
from pagedllm.spec_decode.rejection_sampler import RejectionSampler, expand_rows

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
SHARED = "Continuous batching lets new requests join while others are still decoding. " * 3
PROMPTS = [SHARED + tail for tail in ("The capital", "Hello, my name", "def add(a, b):")] + [
    "The capital of France is Paris.", "naïve café"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def loopy_dir(tmp_path_factory) -> str:
    """conftest's Llama with every attention output projection zeroed: the next token depends on the last
    one only, so greedy decoding falls into a short cycle (9 tokens long) that n-gram drafts predict."""
    from conftest import build_checkpoint
    from transformers import AutoModelForCausalLM

    path = build_checkpoint(str(tmp_path_factory.mktemp("loopy")), "llama", max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    model.save_pretrained(path)
    return path


def run(model: str, prompts, params, spec: dict | None = None, **kwargs):
    llm = LLM(model=model, **{"max_model_len": 256, "speculative_config": spec, **kwargs})
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return outputs, llm


# ----- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "error", "message"), [
    ({"method": "ngram"}, ValueError, "needs 'num_speculative_tokens'"),
    ({"num_speculative_tokens": 3}, ValueError, "needs a 'method'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, ValueError, "positive integer, got 0"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, ValueError,
     r"prompt_lookup_min \(4\) must be <= prompt_lookup_max \(2\)"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 0}, ValueError, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 3, "num_lookahead": 2}, ValueError, "unknown keys"),
    ({"method": "magic", "num_speculative_tokens": 3}, ValueError, "method must be one of"),
    ({"method": "eagle3", "model": "head", "num_speculative_tokens": 3}, NotImplementedError, "'eagle3'"),
    ({"method": "ngram", "num_speculative_tokens": 3, "quantization": "fp8"}, NotImplementedError, "quantization"),
])
def test_bad_speculative_configs_are_refused_before_loading(config, error, message):
    with pytest.raises(error, match=message):
        LLM("/nonexistent/model", speculative_config=config)


def test_ngram_lookup_defaults_follow_vllm():
    assert SpeculativeConfig.from_dict({}) is None and SpeculativeConfig.from_dict(None) is None
    both = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)
    only_max = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (2, 2)
    assert SpeculativeConfig.from_dict({"model": "path/to/draft", "num_speculative_tokens": 3}).method == "draft_model"


def test_speculative_config_flag_takes_json(llama_dir):
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model", llama_dir, "--speculative-config", json.dumps(NGRAM)])
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert config.speculative_config == SpeculativeConfig(**NGRAM)
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", "{method: ngram}"])


# ----- the proposer ------------------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_longest_earliest_match():
    propose = NgramProposer(SpeculativeConfig("ngram", 3, prompt_lookup_min=1, prompt_lookup_max=3)).propose
    # The tail "7 8 9" occurred at 0: the three tokens after it.
    assert propose(np.array([7, 8, 9, 1, 2, 5, 9, 7, 8, 9])) == [1, 2, 5]
    # "8 9" alone occurs earlier twice, "5 8 9" once: the longer match wins, though it is later.
    assert propose(np.array([8, 9, 1, 5, 8, 9, 2, 8, 9, 3, 5, 8, 9])) == [2, 8, 9]
    # Of equal matches the earliest wins; proposals stop at the end of the context.
    assert propose(np.array([4, 1, 4, 2, 4])) == [1, 4, 2]
    assert propose(np.array([1, 2, 3, 1, 2])) == [3, 1, 2]
    assert propose(np.array([1, 2, 3, 4])) == []  # the tail never occurred before
    assert propose(np.array([5])) == []
    strict = NgramProposer(SpeculativeConfig("ngram", 2, prompt_lookup_min=2, prompt_lookup_max=2)).propose
    assert strict(np.array([3, 1, 2, 6, 1, 3])) == []  # only the 1-token tail "3" occurred before


# ----- the scheduler's side ------------------------------------------------------------------------------
def test_drafts_count_in_the_budget_get_blocks_and_only_accepted_tokens_are_hashed():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv)
    request = Request("a", list(range(10, 16)), SamplingParams(temperature=0.0, max_tokens=20), 20, block_size=4)
    scheduler.add_request(request)
    prefill = scheduler.schedule()
    scheduler.update_from_output(prefill, ModelRunnerOutput(sampled_token_ids={"a": 40},
                                                            draft_token_ids={"a": [41, 42, 43, 44]}))
    assert request.spec_token_ids == [41, 42, 43, 44] and request.num_computed_tokens == 6
    step = scheduler.schedule()
    (sched,) = step.scheduled
    # The last token and its four drafts: 5 tokens of the budget, positions 6..10 in blocks 0..2.
    assert sched.token_ids == [40, 41, 42, 43, 44] and sched.spec_token_ids == [41, 42, 43, 44]
    assert step.num_batched_tokens == 5 and len(sched.block_ids) == 3 and sched.sample
    # Two drafts accepted, then the target's own token: 41, 42, 77 are emitted.
    scheduler.update_from_output(step, ModelRunnerOutput(sampled_token_ids={"a": 77}, num_accepted_tokens={"a": 2}))
    assert request.output_token_ids == [40, 41, 42, 77]
    assert request.num_computed_tokens == 9 and request.num_tokens == 10  # 77 runs next step
    assert len(kv.get_block_ids("a")) == 3  # positions 0..9: the block of the rejected drafts' tail is kept
    assert scheduler.spec_decoding_stats.num_accepted_tokens_per_pos == [1, 1, 0, 0]
    # Blocks are registered only under hashes of accepted tokens.
    for block_hash in request.block_hashes:
        assert block_hash[1] == tuple(request.all_token_ids[len(block_hash[1]) * request.block_hashes.index(block_hash):][:4])
    # A budget too small for every draft keeps the first ones.
    request.spec_token_ids = [1, 2, 3, 4]
    scheduler.config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=3, max_model_len=64)
    (cut,) = scheduler.schedule().scheduled
    assert cut.token_ids == [77, 1, 2] and cut.spec_token_ids == [1, 2]


def test_rejected_drafts_release_the_blocks_only_they_used():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv)
    request = Request("a", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=20), 20, block_size=4)
    scheduler.add_request(request)
    prefill = scheduler.schedule()
    scheduler.update_from_output(prefill, ModelRunnerOutput(sampled_token_ids={"a": 8}, draft_token_ids={"a": [9] * 5}))
    step = scheduler.schedule()  # positions 3..8: three blocks
    assert len(kv.get_block_ids("a")) == 3
    third = kv.req_to_blocks["a"][2]
    scheduler.update_from_output(step, ModelRunnerOutput(sampled_token_ids={"a": 1}, num_accepted_tokens={"a": 0}))
    assert len(kv.get_block_ids("a")) == 2 and third.ref_cnt == 0 and third.block_hash is None
    assert kv.block_pool.get_new_blocks(1) == [third]  # handed out before blocks that may cache a prefix


def test_max_tokens_caps_the_drafts():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv)
    request = Request("a", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3), 3, block_size=4)
    scheduler.add_request(request)
    scheduler.update_from_output(scheduler.schedule(),
                                 ModelRunnerOutput(sampled_token_ids={"a": 8}, draft_token_ids={"a": [9, 9, 9]}))
    assert request.spec_token_ids == [9]  # 1 output so far, 3 at most: one draft and the token after it


# ----- the rejection sampler ---------------------------------------------------------------------------
def _rows(params: SamplingParams, drafts: list[int], copies: int) -> list[ScheduledRequest]:
    return [ScheduledRequest(f"r{i}", [0] * (len(drafts) + 1), 0, [0], params, [0], [], True, spec_token_ids=drafts)
            for i in range(copies)]


def test_rejection_sampling_emits_the_target_distribution_with_top_p():
    """Position 0 of many requests drafting the same token: what is emitted there (the draft when accepted,
    the recovered token otherwise) must follow the processed target distribution, top-p included; likewise
    the bonus position after an accepted draft."""
    torch.manual_seed(0)
    vocab, copies = 12, 30000
    logits_one = torch.randn(2, vocab) * 1.5
    params = SamplingParams(temperature=1.0, top_p=0.8)
    requests = _rows(params, [int(logits_one[0].argsort()[-2])], copies)  # draft: the second likeliest token
    rows, drafts = expand_rows(requests)
    meta = build_sampling_metadata(rows, {}, vocab, torch.device("cpu"))
    logits = logits_one.repeat(copies, 1)
    out = RejectionSampler(torch.Generator().manual_seed(1))(logits, meta, torch.tensor(drafts))
    target = random_sampling_probs(logits_one, build_sampling_metadata(rows[:2], {}, vocab, torch.device("cpu")))
    accepted = out.accepted.view(copies, 2)[:, 0]
    first = torch.where(accepted, torch.tensor(drafts[0]), out.output_token_ids.view(copies, 2)[:, 0])
    bonus = out.output_token_ids.view(copies, 2)[accepted, 1]
    for emitted, probs in ((first, target[0]), (bonus, target[1])):
        support = probs > 0
        observed = torch.bincount(emitted, minlength=vocab)
        assert observed[~support].sum() == 0  # nothing outside the top-p set
        expected = probs[support].double() / probs[support].double().sum() * len(emitted)
        assert chisquare(observed[support].double().numpy(), expected.numpy()).pvalue > 1e-3
    assert 0 < accepted.float().mean() < 1


def test_greedy_verification_is_an_exact_match():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    rows, drafts = expand_rows(_rows(SamplingParams(temperature=0.0), [1, 2], 1))
    out = RejectionSampler(torch.Generator())(logits, build_sampling_metadata(rows, {}, 3, torch.device("cpu")),
                                              torch.tensor(drafts))
    # Draft 1 is the argmax (kept), draft 2 is not (rejected, the argmax 0 comes instead).
    assert out.accepted.tolist() == [True, False, False] and out.output_token_ids.tolist() == [1, 0, 2]


def test_each_row_sees_the_drafts_before_it_as_output():
    """Penalties and min_tokens at draft position i count drafts 0..i-1 as generated: a frequency penalty
    rejects a token drafted twice in a row, and the stop token is allowed from the row where min_tokens is
    reached."""
    logits = torch.tensor([[0.0, 5.0, 4.0]] * 3)  # token 1 is the favourite at every position
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    rows, drafts = expand_rows(_rows(params, [1, 1], 1))
    assert [r.output_token_ids for r in rows] == [[], [1], [1, 1]]
    out = RejectionSampler(torch.Generator())(logits, build_sampling_metadata(rows, {}, 3, torch.device("cpu")),
                                              torch.tensor(drafts))
    assert out.accepted.tolist()[:2] == [True, False] and out.output_token_ids.tolist()[1] == 2
    eos = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=False)
    eos.all_stop_token_ids = {1}
    rows, drafts = expand_rows(_rows(eos, [2, 1], 1))
    out = RejectionSampler(torch.Generator())(logits, build_sampling_metadata(rows, {}, 3, torch.device("cpu")),
                                              torch.tensor(drafts))
    # Row 0 (no output yet) masks the stop token 1, so draft 2 is the argmax; row 1 (one output) still masks it
    # and rejects draft 1; with two outputs (the bonus row) it would be allowed again.
    assert out.accepted.tolist()[:2] == [True, False] and out.output_token_ids.tolist() == [2, 2, 1]


# ----- the engine: greedy tokens unchanged ---------------------------------------------------------------
@pytest.mark.parametrize("model", ["llama_dir", "loopy_dir"])
def test_greedy_output_is_unchanged_with_chunked_prefill_preemption_and_prefix_caching(model, request):
    path = request.getfixturevalue(model)
    reference, plain = run(path, PROMPTS, GREEDY, enable_prefix_caching=False, max_model_len=192)
    plain.shutdown()
    # A 24-token step budget chunks every prompt, drafts share it; 14 blocks of 16 tokens cannot hold the
    # five sequences at once, so some are preempted and recomputed.
    outputs, llm = run(path, PROMPTS, GREEDY, NGRAM, max_num_batched_tokens=24, num_gpu_blocks_override=14,
                   max_model_len=192)
    assert token_ids(outputs) == token_ids(reference)
    assert metric(llm, "num_preemptions") > 0 and metric(llm, "spec_decode_num_drafts") > 0
    again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)  # the prompts' blocks now come from the prefix cache
    assert token_ids(again) == token_ids(reference) and metric(llm, "prefix_cache_hits") > 0
    if model == "loopy_dir":  # the cycle is predicted: most steps keep several tokens
        assert metric(llm, "spec_decode_num_accepted_tokens") > 0.5 * metric(llm, "spec_decode_num_draft_tokens")
    assert_all_blocks_free(llm)
    llm.shutdown()


def test_mixed_batches_n_greater_than_one_penalties_and_logprobs(loopy_dir):
    """One batch: greedy requests with n=2, penalties, logprobs, a constrained request (never drafted) and
    random requests beside them, each greedy one as without speculation."""
    from pagedllm.sampling_params import StructuredOutputsParams

    greedy = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, n=2),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3,
                             frequency_penalty=0.2),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=StructuredOutputsParams(
                  choice=["Paris", "London", "Berlin"]))]
    prompts = PROMPTS[:4]
    extra = [SamplingParams(temperature=1.0, top_k=5, max_tokens=30, ignore_eos=True, seed=3)] * 2
    reference, plain = run(loopy_dir, prompts, greedy)
    plain.shutdown()
    outputs, llm = run(loopy_dir, prompts + PROMPTS[3:5], greedy + extra, NGRAM)
    assert token_ids(outputs[:4]) == token_ids(reference)
    assert [o.outputs[0].text for o in outputs[:4]] == [o.outputs[0].text for o in reference]
    for got, want in zip(outputs[2].outputs[0].logprobs, reference[2].outputs[0].logprobs):
        assert got.keys() == want.keys()
        assert all(abs(got[t].logprob - want[t].logprob) < 1e-4 and got[t].rank == want[t].rank for t in got)
    assert metric(llm, "spec_decode_num_accepted_tokens") > 0
    assert_all_blocks_free(llm)
    llm.shutdown()


def test_stops_and_lengths_inside_accepted_runs_end_where_they_would(loopy_dir):
    probe, plain = run(loopy_dir, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    tokens, text = probe[0].outputs[0].token_ids, probe[0].outputs[0].text
    stop_id = tokens[25]  # late in the cycle, where whole drafts are accepted
    stop_text = text[len(text) * 2 // 3:][:3]
    cases = [SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_id]),
             SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_id], min_tokens=22),
             SamplingParams(temperature=0.0, max_tokens=40, stop=[stop_text], ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=40, stop=[stop_text], include_stop_str_in_output=True,
                            ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True)]
    prompts = PROMPTS[:1] * len(cases)
    reference = plain.generate(prompts, cases, use_tqdm=False)
    plain.shutdown()
    outputs, llm = run(loopy_dir, prompts, cases, NGRAM)
    for got, want in zip(outputs, reference):
        g, w = got.outputs[0], want.outputs[0]
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (w.token_ids, w.text, w.finish_reason,
                                                                         w.stop_reason)
    assert metric(llm, "spec_decode_num_accepted_tokens") > 0
    assert_all_blocks_free(llm)
    llm.shutdown()


def test_lora_requests_verify_drafts_through_their_adapter(llama_dir, tmp_path):
    from lora_utils import build_adapter

    from pagedllm.lora.request import LoRARequest

    adapter = LoRARequest("a", 1, build_adapter(llama_dir, str(tmp_path / "a"), seed=1))
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    kwargs = dict(enable_lora=True, max_lora_rank=8)
    llm = LLM(model=llama_dir, max_model_len=256, **kwargs)
    reference = token_ids(llm.generate(PROMPTS[:3], params, lora_request=[adapter, None, adapter], use_tqdm=False))
    llm.shutdown()
    llm = LLM(model=llama_dir, max_model_len=256, speculative_config=NGRAM, **kwargs)
    got = token_ids(llm.generate(PROMPTS[:3], params, lora_request=[adapter, None, adapter], use_tqdm=False))
    assert got == reference and metric(llm, "spec_decode_num_drafts") > 0
    llm.shutdown()


# ----- the engine: sampling in distribution --------------------------------------------------------------
def greedy_chains(model_dir: str) -> list[int]:
    """Every token of the loopy model once, each first followed by its greedy successor: from each token not
    yet written, its greedy chain until it reaches a written one. After any sampled token, an n-gram draft is
    then the greedy continuation, which the target keeps often but far from always at temperature 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    with torch.no_grad():  # attention is off: a token's successor does not depend on its context
        successor = model(input_ids=torch.arange(vocab)[:, None]).logits[:, -1].argmax(-1).tolist()
    written: set[int] = set()
    prompt: list[int] = []
    for token in range(vocab):
        while token not in written:
            written.add(token)
            prompt.append(token)
            token = successor[token]
        if prompt[-1] != token:
            prompt.append(token)
    return prompt


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle"])
def test_sampled_distribution_with_speculation_matches_without(loopy_dir, method, tmp_path):
    """Temperature 1 with top-p, 1500 seeded requests per engine, on a prompt where drafts are kept about a
    quarter of the time (ngram) or about half (the loopy model as its own draft, or an EAGLE head that guesses
    its greedy token: `eagle_utils.perfect_head`); the tokens
    at output positions 1..3 (drafted ones: position 0 comes from the prompt step) are compared by a
    chi-square test of homogeneity. (A sampler that drew rejected positions from the full distribution
    instead of the residual fails it with p ~ 1e-8.)"""
    prompt = {"prompt_token_ids": greedy_chains(loopy_dir)}
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=4, ignore_eos=True, seed=i) for i in range(1500)]
    spec_config = {"ngram": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1,
                             "prompt_lookup_max": 1},
                   "draft_model": {"method": "draft_model", "model": loopy_dir, "num_speculative_tokens": 2}}.get(method)
    if method == "eagle":
        from eagle_utils import perfect_head

        spec_config = {"method": "eagle", "model": perfect_head(str(tmp_path / "head"), loopy_dir),
                       "num_speculative_tokens": 2}
    samples = []
    for spec in (None, spec_config):
        outputs, llm = run(loopy_dir, [prompt] * len(params), params, spec, max_model_len=1024)
        samples.append([o.outputs[0].token_ids[1:] for o in outputs])
        if spec is not None:
            drafted, accepted = metric(llm, "spec_decode_num_draft_tokens"), metric(llm, "spec_decode_num_accepted_tokens")
            assert 0.1 * drafted < accepted < 0.9 * drafted  # both branches of the rejection sampler ran often
        llm.shutdown()
    for position in range(3):
        plain = [t[position] for t in samples[0]]
        spec = [t[position] for t in samples[1]]
        vocab = sorted(set(plain) | set(spec))
        table = np.array([[seq.count(t) for t in vocab] for seq in (plain, spec)])
        table = table[:, table.sum(axis=0) >= 10]  # the chi-square approximation needs populated cells
        assert chi2_contingency(table).pvalue > 1e-3, position


# ----- the default model ---------------------------------------------------------------------------------
@pytest.mark.real_model
@pytest.mark.slow  # about 70 s on one busy thread
def test_default_model_greedy_is_unchanged_under_pressure(smollm2_gguf):
    """SmolLM2 copying text from its prompt (drafts mostly accepted) and writing freely (mostly rejected), in
    one batch with a sampled request, n=2, a 48-token step budget (chunked prefill), a cache too small for
    all of them (preemption), then again from the prefix cache."""
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}

    def most_drafts_kept(llm: LLM) -> None:
        assert metric(llm, "spec_decode_num_accepted_tokens") > 0.5 * metric(llm, "spec_decode_num_draft_tokens")

    results = [default_model_under_pressure(spec, 80, most_drafts_kept) for spec in (None, ngram)]
    assert results[1] == results[0]
    assert results[0][0] == results[0][1]


def test_bench_reports_acceptance(loopy_dir, tmp_path, capsys):
    from pagedllm.entrypoints.cli.main import main

    out = tmp_path / "latency.json"
    rc = main(["bench", "latency", "--model", loopy_dir, "--max-model-len", "128", "--batch-size", "2",
               "--input-len", "8", "--output-len", "40", "--num-iters", "1", "--num-iters-warmup", "0",
               "--speculative-config", json.dumps(NGRAM), "--output-json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["spec_decode_num_accepted_tokens"] > 0
    assert result["spec_decode_acceptance_rate"] == pytest.approx(
        result["spec_decode_num_accepted_tokens"] / result["spec_decode_num_draft_tokens"])
    assert result["spec_decode_acceptance_rate_pos0"] >= result["spec_decode_acceptance_rate_pos3"]
    assert "spec_decode_mean_acceptance_length" in capsys.readouterr().out


@pytest.mark.slow  # a server process: about 15 s
def test_server_takes_the_flag_streams_runs_and_exports_the_counters(loopy_dir):
    import httpx

    from test_server_harness import RemoteServer, sse_events

    offline = LLM(model=loopy_dir, max_model_len=256)
    expected = offline.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].text
    offline.shutdown()
    server = RemoteServer(loopy_dir, "--max-model-len", "256", "--served-model-name", "loopy",
                          "--speculative-config", json.dumps(NGRAM))
    try:
        body = {"model": "loopy", "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        plain = {k: v for k, v in body.items() if k != "ignore_eos"}
        assert server.client().completions.create(**plain, extra_body={"ignore_eos": True}).choices[0].text == expected
        with httpx.stream("POST", server.url("/v1/completions"), json={**body, "stream": True},
                          headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60) as response:
            chunks = [e["choices"][0]["text"] for e in sse_events(response) if isinstance(e, dict) and e["choices"]]
        assert "".join(chunks) == expected
        text = httpx.get(server.url("/metrics")).text
        for name in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                     "spec_decode_num_accepted_tokens_total"):
            assert f"pagedllm:{name}" in text, name
        per_pos = [line for line in text.splitlines() if line.startswith("pagedllm:spec_decode_num_accepted_tokens_per_pos")]
        assert len(per_pos) == NGRAM["num_speculative_tokens"] and 'position="0"' in per_pos[0]
        assert server.metrics()["pagedllm:spec_decode_num_accepted_tokens_total"] > 0
    finally:
        assert server.stop() in (0, -15), server.read_log()


def test_the_page_names_real_code():
    """docs/speculative_decoding.md cites files and functions by the walkthrough's convention."""
    from pathlib import Path

    from test_walkthrough import check

    page = Path(__file__).resolve().parent.parent / "docs" / "speculative_decoding.md"
    problems, count = check(page.read_text(encoding="utf-8"), base=page.parent)
    assert not problems and count >= 15, problems


# ----- method "draft_model" ------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "message"), [
    ({"method": "draft_model", "num_speculative_tokens": 3}, "needs 'model'"),
])
def test_a_draft_model_needs_a_model(config, message):
    with pytest.raises(ValueError, match=message):
        LLM("/nonexistent/model", speculative_config=config)


def test_a_draft_model_must_share_the_tokenizer(llama_dir, tmp_path):
    from conftest import build_checkpoint

    other = build_checkpoint(str(tmp_path / "other"), "llama", extra_tokens=("<think>", "</think>"))
    with pytest.raises(ValueError, match="must share the tokenizer"):
        EngineArgs(model=llama_dir, speculative_config={"method": "draft_model", "model": other,
                                                        "num_speculative_tokens": 3}).create_engine_config()
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        EngineArgs(model=llama_dir, tensor_parallel_size=2, speculative_config={
            "method": "draft_model", "model": llama_dir, "num_speculative_tokens": 3}).create_engine_config()


def test_the_target_as_its_own_draft_keeps_every_draft(llama_dir):
    """A draft model that is the target proposes exactly the target's greedy tokens, so every draft is kept
    unless the draft's K/V cache (its own, under the target's block tables) differs from the target's: through
    chunked prefill, preemption, and blocks that come from the prefix cache (filled in an earlier step by both
    models)."""
    reference, plain = run(llama_dir, PROMPTS, GREEDY, max_model_len=192)
    plain.shutdown()
    spec = {"method": "draft_model", "model": llama_dir, "num_speculative_tokens": 4}
    outputs, llm = run(llama_dir, PROMPTS, GREEDY, spec, max_model_len=192, max_num_batched_tokens=24,
                       num_gpu_blocks_override=14)
    assert token_ids(outputs) == token_ids(reference) and metric(llm, "num_preemptions") > 0
    drafted = metric(llm, "spec_decode_num_draft_tokens")
    assert metric(llm, "spec_decode_num_accepted_tokens") == drafted > 0
    again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(again) == token_ids(reference) and metric(llm, "prefix_cache_hits") > 0
    assert metric(llm, "spec_decode_num_accepted_tokens") == metric(llm, "spec_decode_num_draft_tokens") > drafted
    assert_all_blocks_free(llm)
    llm.shutdown()


def test_another_draft_model_changes_nothing(llama_dir, loopy_dir):
    """The loopy model as the draft of the random Llama: it guesses wrong nearly always; greedy and logprobs
    stay the target's, and a sampled request runs beside them."""
    params = [GREEDY, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, top_p=0.9, max_tokens=40, ignore_eos=True, seed=1)]
    reference, plain = run(llama_dir, PROMPTS[:2], params[:2])
    plain.shutdown()
    spec = {"method": "draft_model", "model": loopy_dir, "num_speculative_tokens": 3}
    outputs, llm = run(llama_dir, PROMPTS[:3], params, spec)
    assert token_ids(outputs[:2]) == token_ids(reference)
    for got, want in zip(outputs[1].outputs[0].logprobs, reference[1].outputs[0].logprobs):
        assert all(abs(got[t].logprob - want[t].logprob) < 1e-4 for t in want)
    assert metric(llm, "spec_decode_num_drafts") > 0
    assert_all_blocks_free(llm)
    llm.shutdown()


@pytest.mark.slow  # two worker processes: about 20 s
def test_tensor_parallel_workers_verify_the_same_drafts(loopy_dir):
    """tensor_parallel_size=2 (two gloo worker processes, each receiving the pickled step): every rank
    proposes and verifies the same drafts, and the tokens are those of one process without speculation."""
    reference, plain = run(loopy_dir, PROMPTS, GREEDY)
    plain.shutdown()
    outputs, llm = run(loopy_dir, PROMPTS, GREEDY, NGRAM, tensor_parallel_size=2)
    assert token_ids(outputs) == token_ids(reference)
    assert metric(llm, "spec_decode_num_accepted_tokens") > 0
    llm.shutdown()


@pytest.mark.real_model
@pytest.mark.slow  # two copies of SmolLM2: about a minute on one busy thread
def test_default_model_as_its_own_draft_model(smollm2_gguf):
    """SmolLM2 drafting for itself (the GGUF as the draft checkpoint): every greedy draft is kept, through
    chunked prefill, preemption and the prefix cache, and the tokens are those of the run without a draft."""
    chats = [[{"role": "user", "content": "Write a short poem about the ocean."}],
             [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]]
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    kwargs = dict(max_model_len=256, max_num_batched_tokens=32, num_gpu_blocks_override=16)
    results = []
    for spec in (None, {"method": "draft_model", "model": str(smollm2_gguf), "num_speculative_tokens": 3}):
        llm = LLM(speculative_config=spec, **kwargs)
        render = llm.get_tokenizer().apply_chat_template
        prompts = [{"prompt_token_ids": render(c, add_generation_prompt=True, tokenize=True, return_dict=False)}
                   for c in chats] * 2
        results.append(token_ids(llm.generate(prompts, greedy, use_tqdm=False)))
        assert metric(llm, "num_preemptions") > 0 and metric(llm, "prefix_cache_hits") > 0
        if spec is not None:
            drafted = metric(llm, "spec_decode_num_draft_tokens")
            assert metric(llm, "spec_decode_num_accepted_tokens") >= 0.95 * drafted > 0
        assert_all_blocks_free(llm)
        llm.shutdown()
    assert results[1] == results[0]


def test_combinations_not_built_yet_are_refused_at_start_up(llama_dir, dense_checkpoint):
    """Pipeline stages, sliding-window layers (KV-cache groups) and vision-language models do not take
    drafts yet: each is a clear ValueError before any model loads, never a run that is wrong."""
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        LLM(model=llama_dir, speculative_config=spec, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="sliding-window"):
        LLM(model=dense_checkpoint("mistral"), speculative_config=spec)
