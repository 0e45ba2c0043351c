"""Structured outputs offline: every constrained output matches its constraint (JSON schemas checked
with `jsonschema`, regexes with `re`, choices by membership), whatever the sampling, with n > 1,
forced preemption and prefix-cache hits; bad constraints fail before any engine work; a grammar that
is still compiling blocks nobody.

Random weights love whitespace, which JSON allows without end: the JSON constraints here set `disable_any_whitespace` (vLLM's option; compact separators)."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "maxItems": 3},
        "address": {"$ref": "#/$defs/address"},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
                                                           "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                          "required": ["city", "zip"], "additionalProperties": False}},
}
PROMPTS = ["The capital of France is", "Hello, my name is", "def add(a, b):", "Prefix caching shares"]


def parse_valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def engine(llama_dir):
    llm = LLM(model=llama_dir, max_model_len=512, max_logprobs=-1, disable_log_stats=True)
    yield llm
    llm.shutdown()


SAMPLINGS = {
    "greedy": dict(temperature=0.0),
    "random": dict(temperature=1.0, seed=7),
    "top-k/p with penalties": dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3,
                                   presence_penalty=0.5, seed=3),
    "min-p with logprobs": dict(temperature=1.5, min_p=0.05, logprobs=3, seed=11),
}


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_json_schema_outputs_validate_under_every_sampling(engine, sampling):
    params = SamplingParams(max_tokens=300, n=2, **SAMPLINGS[sampling], structured_outputs=StructuredOutputsParams(
        json=PERSON, disable_any_whitespace=True))
    outputs = engine.generate(PROMPTS, params, use_tqdm=False)
    for out in outputs:
        assert len(out.outputs) == 2
        for completion in out.outputs:
            assert completion.finish_reason == "stop", completion.text
            parse_valid(completion.text, PERSON)
            if params.logprobs:
                assert_logprobs_follow_the_grammar(engine, completion)


def assert_logprobs_follow_the_grammar(engine, completion) -> None:
    """Logprobs are those of the constrained distribution (vLLM's order): replaying the output through
    xgrammar's own matcher, a top-k token has a finite logprob exactly when the grammar allows it."""
    import xgrammar as xgr

    tok = engine.get_tokenizer()
    vocab = engine.llm_engine.config.model_config.vocab_size
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(PERSON), any_whitespace=False,
                                                              separators=(",", ":")))
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for step, token_id in zip(completion.logprobs, completion.token_ids):
        matcher.fill_next_token_bitmask(bitmask)
        for candidate, logprob in step.items():
            allowed = bool((bitmask[0, candidate // 32] >> (candidate % 32)) & 1)
            assert allowed == (logprob.logprob > float("-inf")), (candidate, logprob)
        assert matcher.accept_token(token_id)


def test_unconstrained_output_would_not_match(engine):
    """The tests above prove something: the same prompts without the constraint are not JSON."""
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    for out in outputs:
        with pytest.raises(ValueError):
            parse_valid(out.outputs[0].text, PERSON)


@pytest.mark.parametrize("constraint, check", [
    (dict(regex=r"[a-z]{3}-[0-9]{2,4}"), lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2,4}", t)),
    (dict(choice=["Paris", "London", 'say "hi"\\']), lambda t: t in ["Paris", "London", 'say "hi"\\']),
    (dict(grammar='root ::= "yes" | "no" | "maybe " [0-9]'), lambda t: re.fullmatch(r"yes|no|maybe [0-9]", t)),
])
def test_regex_choice_and_grammar(engine, constraint, check):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=400, n=3,
                            structured_outputs=StructuredOutputsParams(**constraint))
    for out in engine.generate(PROMPTS, params, use_tqdm=False):
        for completion in out.outputs:
            assert completion.finish_reason == "stop", completion.text
            assert check(completion.text), completion.text


def test_json_object(engine):
    """Any JSON object. A random model may never close its strings, so an output cut at max_tokens is
    checked to be a prefix xgrammar's own matcher accepts; a finished one must parse to an object."""
    import xgrammar as xgr

    tok = engine.get_tokenizer()
    vocab = engine.llm_engine.config.model_config.vocab_size
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=(",", ":"))
    params = SamplingParams(temperature=0.0, max_tokens=100, structured_outputs=StructuredOutputsParams(
        json_object=True, disable_any_whitespace=True))
    finished = 0
    for out in engine.generate(PROMPTS, params, use_tqdm=False):
        completion = out.outputs[0]
        matcher = xgr.GrammarMatcher(compiled)
        assert all(matcher.accept_token(t) for t in completion.token_ids), completion.text
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
            finished += 1
        else:
            assert completion.text.startswith("{")
            with pytest.raises(ValueError):
                json.loads(completion.text)
    assert finished > 0


def test_constrained_greedy_equals_the_masked_argmax(engine):
    """Greedy under a choice constraint picks the best token the grammar allows: the first token of the
    output is the argmax of the prompt's unconstrained next-token logprobs over the tokens that spell
    the beginning of a choice."""
    tok = engine.get_tokenizer()
    choices = ["Paris", "London", "Berlin", "Rome"]
    first_ids = [t for t in range(len(tok)) if (text := tok.decode([t]))
                 and any(c.startswith(text) for c in choices)]
    prompt = PROMPTS[0]
    ref = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, logprobs=-1), use_tqdm=False)
    lps = ref[0].outputs[0].logprobs[0]
    best = max(first_ids, key=lambda t: lps[t].logprob)
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=
                                                   StructuredOutputsParams(choice=choices)), use_tqdm=False)
    assert out[0].outputs[0].token_ids[0] == best


def test_preemption_and_prefix_cache_keep_the_grammar(llama_dir):
    """A cache too small for all sequences forces preemptions (recompute); shared prompts hit the prefix
    cache. Outputs still validate, and equal those of a roomy engine (greedy)."""
    params = SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=StructuredOutputsParams(json=PERSON, disable_any_whitespace=True))
    prompts = [PROMPTS[0] + " " + p for p in PROMPTS] * 2
    roomy = LLM(model=llama_dir, max_model_len=256, disable_log_stats=True)
    expected = [o.outputs[0].text for o in roomy.generate(prompts, params, use_tqdm=False)]
    roomy.shutdown()
    tight = LLM(model=llama_dir, max_model_len=256, num_gpu_blocks_override=20, block_size=16, disable_log_stats=True)
    got = [o.outputs[0].text for o in tight.generate(prompts, params, use_tqdm=False)]
    core = tight.llm_engine.engine_core.core
    assert core.scheduler.num_preemptions > 0
    assert core.kv_cache_manager.prefix_cache_hits > 0
    tight.shutdown()
    assert got == expected
    for text in got:
        parse_valid(text, PERSON)


@pytest.mark.parametrize("constraint, field", [
    (dict(json={"type": "object", "properties": {"a": {"type": "strin"}}}), "structured_outputs.json"),
    (dict(json='{"type": "object",'), "structured_outputs.json"),
    (dict(regex="[a-z"), "structured_outputs.regex"),
    (dict(grammar="root ::= foo"), "structured_outputs.grammar"),
])
def test_invalid_constraints_are_value_errors_naming_the_field(engine, constraint, field):
    params = SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))
    with pytest.raises(ValueError, match=re.escape(field)):
        engine.generate(["hi"], params, use_tqdm=False)
    assert not engine.llm_engine.has_unfinished_requests()
    assert engine.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(json={}, regex="a"), "only use one kind"),
    (dict(), "must use one kind"),
    (dict(choice=[]), "non-empty list"),
    (dict(choice="ab"), "non-empty list"),
    (dict(json=3), "JSON schema"),
    (dict(json_object=False), "must be true"),
])
def test_structured_outputs_params_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_takes_a_dict_and_refuses_unknown_keys():
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams(structured_outputs={"regexp": "a+"})


def test_token_bitmask_matches_xgrammar():
    """The sampler's unpacking of the bitmask equals xgrammar's own kernel on random masks."""
    import xgrammar as xgr

    from pagedllm.sample.sampler import apply_token_bitmask

    gen = torch.Generator().manual_seed(0)
    for vocab in (31, 32, 384, 1000):
        logits = torch.randn(3, vocab, generator=gen)
        bitmask = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
        expected = logits.clone()
        xgr.apply_token_bitmask_inplace(expected, bitmask)
        assert torch.equal(apply_token_bitmask(logits, bitmask), expected)


def test_a_compiling_grammar_blocks_nobody(llama_dir):
    """While one request's grammar compiles, an unconstrained request behind it is admitted and decodes;
    the constrained one starts once its grammar is ready."""
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.engine.engine_core import EngineCore
    from pagedllm.request import EngineCoreRequest

    core = EngineCore(EngineArgs(model=llama_dir, max_model_len=256).create_engine_config())
    manager = core.structured_output_manager
    release = threading.Event()
    compile_ = manager._compile
    manager._compile = lambda key: (release.wait(30), compile_(key))[1]
    try:
        eos = {1}
        slow = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
        slow.all_stop_token_ids |= eos
        core.add_request(EngineCoreRequest("slow", [0, 5, 6], slow, 8, 0.0))
        core.add_request(EngineCoreRequest("free", [0, 7, 8], SamplingParams(temperature=0.0, max_tokens=4), 4, 0.0))
        produced: dict[str, int] = {}
        for _ in range(4):
            for out in core.step():
                produced[out.request_id] = produced.get(out.request_id, 0) + len(out.new_token_ids)
        assert produced == {"free": 4}
        assert [r.request_id for r in core.scheduler.waiting] == ["slow"]
        release.set()
        for _ in range(50):
            if not core.has_unfinished_requests():
                break
            for out in core.step():
                produced[out.request_id] = produced.get(out.request_id, 0) + len(out.new_token_ids)
        assert produced["slow"] > 0 and not core.has_unfinished_requests()
    finally:
        release.set()
        core.shutdown()


def test_equal_constraints_compile_once(llama_dir):
    """The n sequences of a request, and later requests with the same schema, share one compilation."""
    llm = LLM(model=llama_dir, max_model_len=256, disable_log_stats=True)
    params = SamplingParams(max_tokens=30, n=3, seed=1, structured_outputs=StructuredOutputsParams(json=PERSON, disable_any_whitespace=True))
    llm.generate(PROMPTS[:2], params, use_tqdm=False)
    manager = llm.llm_engine.engine_core.core.structured_output_manager
    assert len(manager._compiled) == 1
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex="a+")),
                 use_tqdm=False)
    assert len(manager._compiled) == 2
    llm.shutdown()


def test_constraint_starts_after_the_reasoning_ends(llama_dir):
    """With a reasoning end token, the grammar masks nothing while the model reasons, and constrains
    every token after that token (the engine core's side of `--reasoning-parser`)."""
    from pagedllm.engine.tokenizer import load_tokenizer
    from pagedllm.request import Request
    from pagedllm.structured_output.manager import StructuredOutputManager

    tok = load_tokenizer(llama_dir)
    manager = StructuredOutputManager(lambda: tok, len(tok))
    end = tok.convert_tokens_to_ids("<|im_end|>")  # stands for </think>
    params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    request = Request("r", [0, 5], params, 16, block_size=16, reasoning_end_token_id=end)
    manager.grammar_init(request)
    while not manager.is_ready(request):
        manager.wait_for_compilation([request], timeout=1.0)
    thinking = tok.encode("The capital of France", add_special_tokens=False)
    for token_id in thinking:  # free text: the grammar would refuse it, but it is not consulted
        assert manager.grammar_bitmask([request]) is None
        request.append_output_token(token_id)
        manager.accept_token(request, token_id)
    request.append_output_token(end)
    manager.accept_token(request, end)
    bitmask, rows = manager.grammar_bitmask([request])
    allowed = {t for t in range(len(tok)) if (bitmask[rows["r"], t // 32] >> (t % 32)) & 1}
    assert allowed and all("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t])) for t in allowed)
    manager.shutdown()


def test_twenty_schemas_on_the_tiny_model_with_n_preemption_and_prefix_cache(llama_dir):
    """The 20 real-world schemas of tests/json_schemas.py on the random-weight model, which writes any
    byte a grammar lets it (control characters in length-bounded strings included: see
    `bounded_strings_as_patterns`): two sequences each (greedy and seeded), in a KV cache too small for
    all of them. Greedy only: sampled, the random model also composes overlong UTF-8 sequences from
    single-byte tokens, which xgrammar 0.2.9 decodes laxly (one character to it, three replacement
    characters to Python), breaking `maxLength`; no trained model writes those."""
    from json_schemas import SCHEMAS

    llm = LLM(model=llama_dir, max_model_len=512, num_gpu_blocks_override=64, disable_log_stats=True)
    params = [SamplingParams(temperature=0.0, max_tokens=500, n=2, structured_outputs=
                             StructuredOutputsParams(json=schema, disable_any_whitespace=True)) for _, schema in SCHEMAS]
    outputs = llm.generate([PROMPTS[0]] * len(SCHEMAS), params, use_tqdm=False)
    core = llm.llm_engine.engine_core.core
    assert core.scheduler.num_preemptions > 0 and core.kv_cache_manager.prefix_cache_hits > 0
    llm.shutdown()
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for (name, schema), out in zip(SCHEMAS, outputs):
        for completion in out.outputs:
            assert completion.finish_reason == "stop", (name, completion.text[-200:])
            jsonschema.validate(json.loads(completion.text), schema, format_checker=checker)


def test_length_bounded_strings_exclude_control_characters():
    """xgrammar's own rule for a `maxLength` string admits raw control characters; the rewrite to a
    pattern does not, and keeps the bounds."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    from pagedllm.structured_output.backend_xgrammar import bounded_strings_as_patterns

    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 2, "maxLength": 4}},
              "required": ["a"]}
    raw = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    fixed = xgr.Grammar.from_json_schema(json.dumps(bounded_strings_as_patterns(schema)), any_whitespace=False)
    assert _is_grammar_accept_string(raw, '{"a": "x\x01y"}')  # the upstream rule this works around
    for text, ok in [('{"a": "xy"}', True), ('{"a": "é🙂z"}', True), ('{"a": "x"}', False),
                     ('{"a": "xyzab"}', False), ('{"a": "x\x01y"}', False), ('{"a": "x\ty"}', False),
                     (b'{"a": "x\xed\xa0\x80"}', False)]:  # a UTF-16 surrogate's bytes: not UTF-8
        assert _is_grammar_accept_string(fixed, text) == ok, text


@pytest.mark.real_model
def test_twenty_schemas_on_the_default_model_with_n_preemption_and_prefix_cache():
    """The 20 real-world schemas of tests/json_schemas.py on SmolLM2, two sequences each, in a KV cache
    too small for them all (preemptions) with prefix caching on (the chat template's shared beginning):
    every output validates with jsonschema, formats included."""
    from json_schemas import SCHEMAS

    llm = LLM(max_model_len=1024, num_gpu_blocks_override=96, disable_log_stats=True)
    messages = [[{"role": "user", "content": f"Write one realistic example of a {name.replace('_', ' ')} as JSON."}]
                for name, _ in SCHEMAS]
    params = [SamplingParams(temperature=0.0, max_tokens=400, n=2,
                             structured_outputs=StructuredOutputsParams(json=schema)) for _, schema in SCHEMAS]
    outputs = llm.chat(messages, params, use_tqdm=False)
    core = llm.llm_engine.engine_core.core
    assert core.scheduler.num_preemptions > 0 and core.kv_cache_manager.prefix_cache_hits > 0
    llm.shutdown()
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for (name, schema), out in zip(SCHEMAS, outputs):
        assert len(out.outputs) == 2
        for completion in out.outputs:
            assert completion.finish_reason == "stop", (name, completion.text[-200:])
            jsonschema.validate(json.loads(completion.text), schema, format_checker=checker)
