"""Mixtral, Qwen3-MoE and Qwen2-MoE: greedy tokens and logprobs equal transformers' (float32), through
chunked prefill, a forced preemption and a prefix-cache hit; tensor parallelism (each expert's
intermediate dimension split) and expert parallelism (whole experts per rank) equal one process."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_preempted_hit_and_freed
from moe_utils import MOE_FAMILIES, build_moe_checkpoint, write_tiny_moe_gguf
from pagedllm import LLM, SamplingParams

SHARED = "Continuous batching lets new requests join while others are still decoding. " * 2
PROMPTS = [SHARED + tail for tail in ("The capital", "Hello, my name", "Prefix caching")] + [
    "The capital of France is Paris.",
    "a",
]
MAX_TOKENS = 32
TOP_K = 2
# 16-token chunks of prefill; 12 blocks of 16 tokens cannot hold the five requests at once.
ENGINE = dict(max_model_len=192, max_num_batched_tokens=16, num_gpu_blocks_override=12)


@pytest.fixture(scope="module", params=list(MOE_FAMILIES))
def moe_dir(request, tmp_path_factory) -> str:
    return build_moe_checkpoint(str(tmp_path_factory.mktemp(request.param)), request.param)


_HF_CACHE: dict[str, list] = {}
_ENGINE_CACHE: dict[tuple, list] = {}


def hf_reference(model_dir: str) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """Per prompt: its ids, transformers' greedy continuation and the log-softmax at each step."""
    if model_dir not in _HF_CACHE:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        refs = []
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            tokens, logprobs = list(ids), []
            with torch.no_grad():  # greedy by hand: generate() would hold back EOS, the engine ignores it
                for _ in range(MAX_TOKENS):
                    logprobs.append(torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), dim=-1))
                    tokens.append(int(logprobs[-1].argmax()))
            refs.append((ids, tokens[len(ids):], torch.stack(logprobs)))
        _HF_CACHE[model_dir] = refs
    return _HF_CACHE[model_dir]


def run_engine(model_dir: str, **parallel) -> list:
    """Two rounds of the prompts (the second finds the shared prefix cached) on a small cache."""
    key = (model_dir, tuple(sorted(parallel.items())))
    if key not in _ENGINE_CACHE:
        llm = LLM(model=model_dir, **ENGINE, **parallel)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K)
            rounds = [llm.generate(PROMPTS, params, use_tqdm=False) for _ in range(2)]
            assert_preempted_hit_and_freed(llm)
        finally:
            llm.shutdown()
        _ENGINE_CACHE[key] = rounds
    return _ENGINE_CACHE[key]


def assert_matches_transformers(model_dir: str, rounds: list) -> None:
    for outputs in rounds:
        for (ids, expected, ref), output in zip(hf_reference(model_dir), outputs):
            assert output.prompt_token_ids == ids
            completion = output.outputs[0]
            assert completion.token_ids == expected
            for step, (token, ours) in enumerate(zip(expected, completion.logprobs)):
                assert math.isclose(ours[token].logprob, ref[step, token].item(), abs_tol=1e-4)
                values, top_ids = ref[step].topk(TOP_K)
                for value, top_id in zip(values.tolist(), top_ids.tolist()):
                    assert math.isclose(ours[top_id].logprob, value, abs_tol=1e-4)


def test_greedy_tokens_and_logprobs_match_transformers(moe_dir):
    assert_matches_transformers(moe_dir, run_engine(moe_dir))


def test_the_pytorch_reference_path_matches_transformers_too(moe_dir, monkeypatch):
    """With the CPU fast paths off the experts run in `fused_experts_reference`."""
    monkeypatch.setenv("PAGEDLLM_CPU_KERNELS", "0")
    llm = LLM(model=moe_dir, max_model_len=192)
    try:
        model = llm.llm_engine.engine_core.core.model_executor.worker.model_runner.model
        methods = {type(m.quant_method).__name__ for m in model.modules() if hasattr(m, "quant_method")}
        assert methods == {"UnquantizedFusedMoEMethod"}
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert_matches_transformers(moe_dir, [outputs])


@pytest.mark.slow  # two worker processes per engine, two engines per family: ~75 s for the six
@pytest.mark.parametrize("enable_expert_parallel", [False, True], ids=["tp2", "tp2-ep"])
def test_tensor_and_expert_parallel_equal_one_process(moe_dir, enable_expert_parallel):
    single = run_engine(moe_dir)
    split = run_engine(moe_dir, tensor_parallel_size=2, enable_expert_parallel=enable_expert_parallel)
    for round_1, round_2 in zip(single, split):
        for one, two in zip(round_1, round_2):
            one, two = one.outputs[0], two.outputs[0]
            assert two.token_ids == one.token_ids
            for token, lp_one, lp_two in zip(one.token_ids, one.logprobs, two.logprobs):
                assert math.isclose(lp_two[token].logprob, lp_one[token].logprob, abs_tol=1e-4)
    assert_matches_transformers(moe_dir, split)


def test_lora_on_a_mixture_of_experts_model_is_refused(moe_dir):
    with pytest.raises(ValueError, match="enable_lora is not implemented for mixture-of-experts models"):
        LLM(model=moe_dir, enable_lora=True)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_a_moe_gguf_matches_transformers_reading_it(arch, tmp_path):
    """llama.cpp's stacked expert tensors (two of them Q8_0) load into the fused-MoE layer; greedy tokens
    and logprobs equal transformers' on the weights its own GGUF loading reads from the same file."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_moe_gguf(str(path), arch)
    config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({name: tensor.float() for name, tensor in tensors.items()}, strict=True)
    prompts = [[5, 17, 42, 99, 7, 250, 13], [60, 61, 62] * 8]
    llm = LLM(model=str(path), max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    llm.shutdown()
    for ids, output in zip(prompts, outputs):
        tokens, completion = list(ids), output.outputs[0]
        with torch.no_grad():
            for ours in completion.logprobs:
                ref = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), dim=-1)
                tokens.append(int(ref.argmax()))
                assert math.isclose(ours[tokens[-1]].logprob, ref[tokens[-1]].item(), abs_tol=1e-4)
        assert completion.token_ids == tokens[len(ids):]
