"""The schema corpus in json_schemas.py is usable as structured-outputs input: every schema is valid
JSON Schema (2020-12), xgrammar compiles it, and its hand-written example is valid by both jsonschema
and xgrammar's grammar. A few wrong instances prove that xgrammar enforces the constraints the corpus
claims to cover (bounds, patterns, formats, enums, maxItems, additionalProperties), not just parses them.

The tokenizer-level checks (the example's SmolLM2 tokens walk the token masks) need the default model's
GGUF and are marked real_model.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from json_schemas import EXAMPLES, SCHEMAS

xgr = pytest.importorskip("xgrammar")
from xgrammar.testing import _is_grammar_accept_string  # noqa: E402

NAMES = [name for name, _ in SCHEMAS]
BY_NAME = dict(SCHEMAS)


def grammar(name: str) -> "xgr.Grammar":
    # xgrammar's defaults (any_whitespace, strict_mode) are what an engine's json= request compiles with.
    return xgr.Grammar.from_json_schema(json.dumps(BY_NAME[name]))


def test_corpus_has_twenty_distinct_schemas_each_with_an_example() -> None:
    assert len(SCHEMAS) == 20
    assert len(set(NAMES)) == 20
    assert set(EXAMPLES) == set(NAMES)


def test_corpus_covers_the_features_it_claims() -> None:
    text = {name: json.dumps(schema) for name, schema in SCHEMAS}
    def count(key: str) -> int:
        return sum(key in t for t in text.values())
    assert count('"$ref"') >= 3 and count('"$defs"') >= 3
    assert 1 <= count('"oneOf"') + count('"anyOf"')
    for key in ('"enum"', '"exclusiveMinimum"', '"exclusiveMaximum"', '"pattern"', '"format"', '"minItems"',
                '"maxItems"', '"maxLength"', '"boolean"', '"null"', '"additionalProperties": false'):
        assert count(key) >= 1, key
    assert '"#/$defs/leaf"' in json.dumps(BY_NAME["tree"]["$defs"]["child"])  # a chain of references


@pytest.mark.parametrize("name", NAMES)
def test_schema_is_valid_json_schema(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(BY_NAME[name])


@pytest.mark.parametrize("name", NAMES)
def test_example_is_valid_by_jsonschema(name: str) -> None:
    validator = jsonschema.Draft202012Validator(BY_NAME[name], format_checker=jsonschema.FormatChecker())
    validator.validate(EXAMPLES[name])


@pytest.mark.parametrize("name", NAMES)
def test_xgrammar_accepts_the_example(name: str) -> None:
    g = grammar(name)
    assert _is_grammar_accept_string(g, json.dumps(EXAMPLES[name]))
    assert _is_grammar_accept_string(g, json.dumps(EXAMPLES[name], indent=2))  # any whitespace


def _with(name: str, path: tuple, value: object) -> dict:
    instance = json.loads(json.dumps(EXAMPLES[name]))
    target = instance
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return instance


WRONG = [
    ("sentiment", ("confidence",), 1.5),  # maximum
    ("person", ("age",), 131),  # integer maximum
    ("person", ("age",), 36.5),  # integer
    ("person", ("email",), "not-an-email"),  # format: email
    ("address", ("postal_code",), "1234"),  # pattern
    ("address", ("country",), "XX"),  # enum
    ("address", ("planet",), "Earth"),  # additionalProperties: false
    ("invoice", ("items", 0, "unit_price"), 0),  # exclusiveMinimum
    ("invoice", ("items",), []),  # minItems
    ("invoice", ("due_date",), "31/03/2025"),  # format: date
    ("product", ("tags",), ["a", "b", "c", "d"]),  # maxItems
    ("github_issue", ("assignee",), {"login": "Bad Login", "id": 1}),  # pattern through $ref
    ("bank_transaction", ("amount",), 1000000),  # exclusiveMaximum
    ("log_record", ("level",), "TRACE"),  # enum
    ("log_record", ("request_id",), "1234"),  # format: uuid
    ("tool_call", ("arguments",), {"query": "x"}),  # oneOf: get_weather's arguments
    ("tree", ("children",), [{"label": "a"}, {"label": "b"}, {"label": "c"}]),  # maxItems, recursive
    ("movie_review", ("summary",), "x" * 121),  # maxLength
    ("api_error", ("status",), 200),  # minimum
]


@pytest.mark.parametrize(("name", "path", "value"), WRONG, ids=[f"{n}-{'.'.join(map(str, p))}" for n, p, _ in WRONG])
def test_wrong_instance_is_rejected_by_both(name: str, path: tuple, value: object) -> None:
    instance = _with(name, path, value)
    validator = jsonschema.Draft202012Validator(BY_NAME[name], format_checker=jsonschema.FormatChecker())
    assert not validator.is_valid(instance)
    assert not _is_grammar_accept_string(grammar(name), json.dumps(instance))


@pytest.mark.real_model
def test_smollm2_tokens_of_every_example_pass_the_token_masks(smollm2_gguf) -> None:
    """Each example, tokenized by SmolLM2's tokenizer, is allowed token by token by the compiled grammar's
    bitmask and then ends the grammar, so a greedy-constrained decode has a path to every schema."""
    from pagedllm.model_executor.gguf_loader import load_gguf_config, load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(smollm2_gguf)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=load_gguf_config(smollm2_gguf).vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    for name, schema in SCHEMAS:
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        for token in tokenizer.encode(json.dumps(EXAMPLES[name]), add_special_tokens=False):
            matcher.fill_next_token_bitmask(bitmask)
            assert _allowed(bitmask, token), (name, tokenizer.decode([token]))
            assert matcher.accept_token(token), (name, tokenizer.decode([token]))
        matcher.fill_next_token_bitmask(bitmask)
        assert all(_allowed(bitmask, stop) for stop in info.stop_token_ids), name
        assert matcher.accept_token(info.stop_token_ids[0]) and matcher.is_terminated(), name


def _allowed(bitmask: torch.Tensor, token: int) -> bool:
    """Whether the (1, ceil(vocab / 32)) int32 bitmask allows `token`."""
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)
