"""The offline API behaves as vLLM's does: prompt forms, ordering, errors, chat, metrics, lifetime."""

from __future__ import annotations

import gc
import weakref

import pytest

from pagedllm import LLM, RequestOutput, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def test_every_prompt_form_returns_outputs_in_input_order(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("Hello, my name is")
    prompts = ["The capital of France is", {"prompt": "Hello, my name is"}, {"prompt_token_ids": ids}, "a"]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [type(o) for o in outs] == [RequestOutput] * 4
    assert [o.prompt for o in outs] == ["The capital of France is", "Hello, my name is", None, "a"]
    # Text is tokenised with BOS; token ids are taken verbatim.
    assert outs[1].prompt_token_ids == ids and ids[0] == tok.bos_token_id
    assert outs[2].prompt_token_ids == ids
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    single = llm.generate("The capital of France is", GREEDY, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert all(o.finished for o in outs)


def test_default_sampling_params_generate_sixteen_tokens(llm):
    out = llm.generate("Hello", SamplingParams(ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 16 and out.outputs[0].finish_reason == "length"
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, use_tqdm=False)[0]  # None -> SamplingParams()
    assert len(out.outputs[0].token_ids) <= 16


def test_one_sampling_params_per_prompt(llm):
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=2, ignore_eos=True),
                                     SamplingParams(max_tokens=5, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]


@pytest.mark.parametrize(
    "prompts, params, match",
    [
        (["a", "b"], [SamplingParams()], "lengths must match"),
        ([{"prompt_token_ids": []}], None, "empty"),
        ([{"prompt_token_ids": [1, 10**6]}], None, "out of vocabulary"),
        (["ok", {"prompt_token_ids": [-1]}], None, "out of vocabulary"),
        ([{"text": "x"}], None, "prompt_token_ids"),
        ([3.5], None, "unsupported prompt"),
    ],
)
def test_bad_input_raises_value_error_and_leaves_engine_clean(llm, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate("still works", GREEDY, use_tqdm=False)[0].finished


def test_prompt_longer_than_max_model_len_names_both_numbers(llm):
    with pytest.raises(ValueError, match=r"256 tokens.*300 input tokens"):
        llm.generate({"prompt_token_ids": [5] * 300}, use_tqdm=False)
    assert llm.generate("still works", GREEDY, use_tqdm=False)[0].finished


def test_output_is_capped_at_max_model_len(llm):
    out = llm.generate({"prompt_token_ids": [5] * 250}, SamplingParams(max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"


def test_max_model_len_beyond_kv_capacity_is_rejected(llama_dir):
    with pytest.raises(ValueError, match=r"max_model_len \(256\).*64 tokens"):
        LLM(model=llama_dir, max_model_len=256, num_gpu_blocks_override=4)


@pytest.mark.parametrize("kv_cache_dtype, match", [("fp8_inc", "kv_cache_dtype must be one of"),
                                                    ("float64", "kv_cache_dtype must be one of")])
def test_unsupported_kv_cache_dtype_is_rejected(llama_dir, kv_cache_dtype, match):
    with pytest.raises(ValueError, match=match):
        LLM(model=llama_dir, max_model_len=256, kv_cache_dtype=kv_cache_dtype)


def test_chat_renders_template_without_second_bos(llm):
    tok = llm.get_tokenizer()
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    out = llm.chat(conversation, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    same = llm.generate({"prompt_token_ids": out.prompt_token_ids}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == same.outputs[0].token_ids
    two = llm.chat([conversation, conversation + [{"role": "assistant", "content": "Paris"},
                                                  {"role": "user", "content": "And Germany?"}]],
                   GREEDY, use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_metrics_count_tokens_and_requests(llm):
    def value(name: str) -> float:
        return next(m.value for m in llm.get_metrics() if m.name == "pagedllm:" + name)

    names = {m.name for m in llm.get_metrics()}
    for required in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting", "num_preemptions",
                     "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens"):
        assert "pagedllm:" + required in names
    before_gen, before_prompt = value("generation_tokens"), value("prompt_tokens")
    out = llm.generate("Hello, my name is", SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert value("generation_tokens") - before_gen == 5
    assert value("prompt_tokens") - before_prompt == len(out.prompt_token_ids)
    assert value("num_requests_running") == 0 and value("kv_cache_usage_perc") == 0.0


def test_progress_bar_reports_throughput(llm, capsys):
    llm.generate(["a", "b"], GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "toks/s" in err


def test_shutdown_frees_the_engine_and_another_llm_can_follow(llama_dir):
    first = LLM(model=llama_dir, max_model_len=128)
    expected = first.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    caches = weakref.ref(first.llm_engine.model_runner.kv_caches[0][0])
    first.shutdown()
    gc.collect()
    assert caches() is None
    second = LLM(model=llama_dir, max_model_len=128)
    assert second.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected
    runner = weakref.ref(second.llm_engine.model_runner)
    del second
    gc.collect()
    assert runner() is None


def test_abort_frees_blocks(llm):
    engine = llm.llm_engine
    engine.add_request("to-abort", "Hello, my name is", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.engine_core.core.kv_cache_manager.usage() > 0
    engine.abort_request("to-abort")
    assert not engine.has_unfinished_requests()
    assert engine.engine_core.core.kv_cache_manager.block_pool.num_free_blocks == engine.engine_core.core.kv_cache_manager.num_blocks


def test_generation_config_sets_default_sampling_params(llama_dir, tmp_path):
    import shutil

    from transformers import GenerationConfig

    model_dir = tmp_path / "with-generation-config"
    shutil.copytree(llama_dir, model_dir)
    GenerationConfig(do_sample=True, temperature=0.0, top_k=7, repetition_penalty=1.3).save_pretrained(model_dir)
    llm = LLM(model=str(model_dir), max_model_len=128)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.repetition_penalty) == (0.0, 0, 1.3)
    # generate(prompts) with no params uses them: greedy with the repetition penalty applied.
    implicit = llm.generate("Hello, my name is", use_tqdm=False)[0].outputs[0].token_ids
    explicit = llm.generate("Hello, my name is", SamplingParams(temperature=0.0, repetition_penalty=1.3),
                            use_tqdm=False)[0].outputs[0].token_ids
    plain = llm.generate("Hello, my name is", SamplingParams(temperature=0.0), use_tqdm=False)[0].outputs[0].token_ids
    assert implicit == explicit != plain
    llm.shutdown()


def test_default_step_budget_by_usage_and_device():
    import torch

    from pagedllm.engine.arg_utils import default_max_num_batched_tokens

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_max_num_batched_tokens("llm_class", cpu) == default_max_num_batched_tokens("llm_class", gpu) == 8192
    assert default_max_num_batched_tokens("openai_api_server", gpu) == 2048  # vLLM's API-server default
    assert default_max_num_batched_tokens("openai_api_server", cpu) == 1024  # finer chunks: a CPU step is slow


def test_logprobs_beyond_max_logprobs_are_refused_as_in_vllm(llm):
    with pytest.raises(ValueError, match=r"logprobs must be between 0 and max_logprobs \(20\), got 21"):
        llm.generate("Hello", SamplingParams(max_tokens=1, logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt_logprobs must be between 0 and max_logprobs \(20\), got -1"):
        llm.generate("Hello", SamplingParams(max_tokens=1, prompt_logprobs=-1), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
