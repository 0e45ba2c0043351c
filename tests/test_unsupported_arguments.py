"""vLLM arguments pagedllm does not implement yet are errors that name them, never silently dropped.

An argument vLLM has is accepted at the value that asks for nothing (its default) and refused
with `NotImplementedError` otherwise; a name nobody defines is a `TypeError`, as in vLLM. All of it
is checked before a model is loaded, so a script learns at once. (The server's request fields are
in `tests/test_server.py`: a 400 naming the field.)
"""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.arg_utils import VLLM_ONLY_ARGS, EngineArgs
from pagedllm.lora.request import LoRARequest

MISSING_MODEL = "/nonexistent/model"  # loading it would be a ValueError: the checks come first


@pytest.mark.parametrize(("name", "value"), [
    ("fully_sharded_loras", True),
    ("speculative_config", {"method": "eagle3", "model": "path/to/eagle3-head", "num_speculative_tokens": 3}),
    ("cpu_offload_gb", 4),
    ("hf_token", "hf_secret"),
    ("scheduling_policy", "priority"),
    ("lora_dtype", "float16"),
    ("revision", "main"),
])
def test_a_vllm_argument_pagedllm_lacks_is_refused_by_name(name, value):
    with pytest.raises(NotImplementedError, match=f"{name}=.* is not supported by pagedllm yet"):
        LLM(MISSING_MODEL, **{name: value})


def test_an_argument_nobody_has_is_a_type_error_as_in_vllm():
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_tokens'"):
        LLM(MISSING_MODEL, max_tokens=5)


def test_vllm_defaults_ask_for_nothing_and_are_accepted():
    for name, arg in VLLM_ONLY_ARGS.items():
        arg.check(name, arg.accepted[0])  # no error
    args = EngineArgs.from_kwargs(model=MISSING_MODEL, fully_sharded_loras=False, pipeline_parallel_size=1, task="generate",
                                  speculative_config=None, cpu_offload_gb=0, max_model_len=64)
    assert args.max_model_len == 64


def test_pooling_runner_arguments_are_engine_arguments_now(llama_dir):
    """runner/convert/task left VLLM_ONLY_ARGS when pooling models landed (tests/test_pooling.py)."""
    for name in ("runner", "convert", "task"):
        assert name not in VLLM_ONLY_ARGS
    args = EngineArgs.from_kwargs(model=llama_dir, runner="pooling", convert="embed")
    assert args.create_engine_config().model_config.runner_type == "pooling"
    with pytest.raises(ValueError, match="runner must be one of"):
        EngineArgs.from_kwargs(model=llama_dir, runner="poolng").create_engine_config()


def test_per_call_and_per_prompt_features_are_refused(llm):
    for kwargs in ({"priority": [1]}, {"tokenization_kwargs": {"truncate_prompt_tokens": 4}},
                   {"mm_processor_kwargs": {"size": 2}}):
        with pytest.raises(NotImplementedError, match=f"{next(iter(kwargs))} is not supported"):
            llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False, **kwargs)
    with pytest.raises(ValueError, match="LoRA is off; start the engine with enable_lora=True"):
        llm.generate("Hello", use_tqdm=False, lora_request=LoRARequest("sql", 1, "/nonexistent/adapter"))
    # images are supported by vision-language models only (tests/test_multimodal.py): a text model refuses them
    with pytest.raises(ValueError, match="takes text only"):
        llm.generate({"prompt": "Describe the image", "multi_modal_data": {"image": b"..."}}, use_tqdm=False)
    with pytest.raises(ValueError, match="unknown prompt key 'propmt'"):
        llm.generate({"propmt": "Hello"}, use_tqdm=False)
    # the defaults run, and nothing was left behind by the refusals
    out = llm.generate("Hello", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False, priority=0,
                       lora_request=None)
    assert len(out[0].outputs[0].token_ids) == 2 and not llm.llm_engine.has_unfinished_requests()


def test_sampling_params_refuse_vllm_fields_pagedllm_lacks():
    with pytest.raises(NotImplementedError, match="logprob_token_ids is not supported"):
        SamplingParams(logprob_token_ids=[3])
    with pytest.raises(NotImplementedError, match="bad_words is not supported"):
        SamplingParams(bad_words=["foo"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'guided_decoding'"):
        SamplingParams(guided_decoding={"regex": "x"})  # gone from vLLM too
    assert SamplingParams(bad_words=[], structured_outputs=None).max_tokens == 16


def test_engine_flags_are_generated_from_engine_args():
    """Every command gets every engine field as a flag: none is listed twice or drifts."""
    import argparse
    import dataclasses

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    dests = {action.dest for action in parser._actions}
    fields = {f.name for f in dataclasses.fields(EngineArgs) if f.metadata.get("cli")}
    assert fields <= dests
    args = parser.parse_args(["--no-enable-chunked-prefill", "-tp", "2", "--max-logprobs", "5", "--trace"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.enable_chunked_prefill, engine_args.tensor_parallel_size, engine_args.max_logprobs,
            engine_args.trace) == (False, 2, 5, True)
    assert EngineArgs.from_cli_args(parser.parse_args([])) == EngineArgs()
