"""xgrammar, the grammar engine behind structured outputs (vLLM's default backend).

xgrammar turns a JSON schema, a regex or an EBNF grammar into a pushdown automaton over the
tokenizer's vocabulary; a `GrammarMatcher` walks it one accepted token at a time and fills, for the
next token, a bitmask of the vocabulary (one bit per token, packed in int32 words). Compiling needs
the tokenizer and takes from milliseconds to seconds; checking a constraint's syntax does not need
the tokenizer and is fast, which is what the frontend does before a request reaches the engine
(`validate`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Optional

import xgrammar as xgr

from pagedllm.logger import init_logger
from pagedllm.sampling_params import StructuredOutputsParams

logger = init_logger(__name__)


def grammar_spec(params: StructuredOutputsParams) -> tuple[str, str]:
    """The constraint as (kind, text): the compile cache's key, and what crosses to the engine core."""
    kind = params.kind
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError:
                return kind, params.json  # `validate` reports it
        spec = json.dumps(bounded_strings_as_patterns(schema))  # key order is the output's
    elif kind == "json_object":
        spec = '{"type": "object"}'
    elif kind == "choice":
        spec = choice_as_ebnf(params.choice or [])
    else:
        spec = getattr(params, kind)
    if kind in ("json", "json_object") and params.disable_any_whitespace:
        kind += ":compact"
    return kind, spec


# A JSON string character: anything but a quote, a backslash or a control character, as JSON requires,
# and no UTF-16 surrogate (xgrammar would accept their 3-byte encodings, which are not valid UTF-8).
_STRING_CHAR = r'[^"\\\x00-\x1f\ud800-\udfff]'


def bounded_strings_as_patterns(schema: Any) -> Any:
    """The schema with each length-bounded plain string (`minLength`/`maxLength`, no `pattern`, `format`,
    `enum` or `const`) turned into the equivalent `pattern`.

    xgrammar 0.2.9 compiles a length-bounded string with a character rule that lacks the exclusion of
    control characters its unbounded strings have, so a model could write a raw tab or NUL and the JSON
    would not parse. A pattern of JSON string characters repeated {min,max} times means the same bounds
    and compiles correctly (escapes are not allowed inside it, as in xgrammar's own bounded rule).
    """
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: bounded_strings_as_patterns(value) for key, value in schema.items()}
    types = out.get("type")
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    bounded = "minLength" in out or "maxLength" in out
    if is_string and bounded and not {"pattern", "format", "enum", "const"} & out.keys():
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_STRING_CHAR}{{{lo},{hi}}}$"
    return out


def choice_as_ebnf(choices: Iterable[str]) -> str:
    """`root ::= "a" | "b"`: each choice a string literal, quotes, backslashes and control characters
    escaped as JSON escapes them (which EBNF literals accept)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def validate(params: StructuredOutputsParams) -> None:
    """Raise ValueError, naming the field, if xgrammar cannot build the constraint."""
    kind, spec = grammar_spec(params)
    field = f"structured_outputs.{params.kind}"
    try:
        if kind.startswith("json"):
            schema = json.loads(spec)
            if not isinstance(schema, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
            xgr.Grammar.from_json_schema(spec)
        elif kind == "regex":
            xgr.Grammar.from_regex(spec)
        elif kind in ("grammar", "choice"):
            xgr.Grammar.from_ebnf(spec)
        elif kind == "structural_tag":
            xgr.Grammar.from_structural_tag(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"{field} is not valid JSON: {e}") from None
    except (RuntimeError, ValueError, TypeError, xgr.InvalidJSONError, xgr.InvalidStructuralTagError) as e:
        raise ValueError(f"{field} is not a valid {_NAMES[params.kind]}: {_first_line(e)}") from None


_NAMES = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regular expression",
          "choice": "list of choices", "grammar": "EBNF grammar", "structural_tag": "structural tag"}


def _first_line(error: Exception) -> str:
    """xgrammar's message without its log prefix (`[15:00:30] /project/cpp/....cc:5082: `)."""
    text = str(error).strip() or type(error).__name__
    return re.sub(r"^\[[0-9:]+\] \S+:[0-9]+: ", "", text.splitlines()[0])[:300]


class XgrammarBackend:
    """Compiles constraints for one tokenizer (xgrammar caches compiled grammars itself too)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        # The model's logits may be wider than the tokenizer's vocabulary (padded embeddings): the
        # bitmask covers every logit, and the padding tokens are never allowed.
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)

    def compile(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        if kind.startswith("json"):
            compact = kind.endswith(":compact")
            return self.compiler.compile_json_schema(spec, any_whitespace=not compact,
                                                     separators=(",", ":") if compact else None)
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        if kind in ("grammar", "choice"):
            return self.compiler.compile_grammar(spec)
        if kind == "structural_tag":
            return self.compiler.compile_structural_tag(spec)
        raise ValueError(f"unknown structured-output kind {kind!r}")

    def matcher(self, compiled: xgr.CompiledGrammar, stop_token_ids: Optional[list[int]]) -> "XgrammarGrammar":
        return XgrammarGrammar(xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None))


class XgrammarGrammar:
    """One request's place in its grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar refuses it (a token the mask allowed
        always passes, so False means a bug or a token decided elsewhere)."""
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def allocate_bitmask(num_rows: int, vocab_size: int) -> Any:
    """An int32 tensor [num_rows, ceil(vocab_size / 32)], every bit set (everything allowed)."""
    return xgr.allocate_token_bitmask(num_rows, vocab_size)
