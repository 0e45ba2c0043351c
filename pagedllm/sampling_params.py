"""`SamplingParams`: how one request is decoded, with vLLM's fields, defaults and checks.

Validation happens once, at construction, so every later stage (scheduler, sampler,
output processor) can trust the values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

# Below this temperature a request is treated as greedy, as in vLLM.
SAMPLING_EPS = 1e-5
# vLLM's (and OpenAI's) range for temperature.
MAX_TEMPERATURE = 2.0
# Every integer a request sets ends up in an int64 tensor or a 64-bit generator seed.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


_UNSUPPORTED_FIELDS = {
    "bad_words": "bad-word lists",
    "logprob_token_ids": "logprobs of chosen token ids",
    "prompt_logprob_token_ids": "prompt logprobs of chosen token ids",
    "thinking_token_budget": "thinking-token budgets",
    "repetition_detection": "repetition detection",
    "watermarking": "watermarking",
    "extra_args": "extra arguments for custom logits processors",
}


# The constraint kinds of `StructuredOutputsParams`, in vLLM's order; a request sets exactly one.
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's `StructuredOutputsParams`): exactly one of a JSON schema
    (`json`, a dict or its JSON text), a regular expression, a list of choices, an EBNF grammar, any
    JSON object (`json_object=True`) or an xgrammar structural tag (JSON text).

    Only the shape is checked here; whether the grammar engine can compile the constraint is checked
    by the frontend before the request reaches the engine (`structured_output/backend_xgrammar.py`).
    """

    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None
    # Options of the JSON constraint.
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None

    def __post_init__(self) -> None:
        kinds = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError("You can only use one kind of structured outputs constraint but multiple are "
                             f"specified: {', '.join(kinds)}.")
        if not kinds:
            raise ValueError("You must use one kind of structured outputs constraint but none are specified "
                             f"(one of {', '.join(STRUCTURED_OUTPUT_KINDS)}).")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object or its JSON text), "
                             f"got {type(self.json).__name__}.")
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {type(value).__name__}.")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {_short(self.choice)}.")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"structured_outputs.json_object must be true when given, got {self.json_object!r}.")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of `STRUCTURED_OUTPUT_KINDS`."""
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) is not None)


class RequestOutputKind(enum.Enum):
    """What each `RequestOutput` of a request carries (vLLM's names)."""

    CUMULATIVE = 0  # everything so far
    DELTA = 1  # only what is new since the previous output (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes (LLM.generate)


@dataclass
class SamplingParams:
    """Sampling parameters for text generation (vLLM-compatible).

    `temperature=0` means greedy decoding whatever top-k/top-p/min-p say; `max_tokens=None`
    means "until the context (`max_model_len`) is full".
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: Optional[StructuredOutputsParams] = None
    # vLLM fields for features pagedllm does not have yet: accepted at their defaults only, so a
    # request never runs without what it asked for (`_refuse_unsupported`).
    bad_words: Optional[list[str]] = None
    logprob_token_ids: Optional[list[int]] = None
    prompt_logprob_token_ids: Optional[Any] = None
    thinking_token_budget: Optional[int] = None
    repetition_detection: Optional[Any] = None
    watermarking: Optional[bool] = None
    extra_args: Optional[dict[str, Any]] = None
    # Filled by the engine: EOS plus the generation config's extra EOS ids.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.top_k == -1:  # vLLM's older spelling of "disabled"
            self.top_k = 0
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"logit_bias must map token ids to floats, got {self.logit_bias!r}") from e
        if isinstance(self.structured_outputs, dict):
            unknown = sorted(set(self.structured_outputs) - {f.name for f in fields(StructuredOutputsParams)})
            if unknown:
                raise ValueError(f"structured_outputs has unknown fields {unknown}.")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}.")
        self._refuse_unsupported()
        self._verify()
        if self.temperature < SAMPLING_EPS:
            # Greedy: the truncation knobs can only change ties, so drop them (vLLM does too).
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _refuse_unsupported(self) -> None:
        for name, feature in _UNSUPPORTED_FIELDS.items():
            value = getattr(self, name)
            if value is not None and value is not False and value != {} and value != []:
                raise NotImplementedError(f"{name} is not supported by pagedllm yet ({feature})")

    def _verify(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name} {msg}, got {_short(getattr(self, name))}.")

        def is_int(value: Any, lo: int = INT64_MIN, hi: int = INT64_MAX) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi

        check(is_int(self.n, 1), "n", "must be an integer >= 1")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(self.repetition_penalty > 0.0, "repetition_penalty", "must be greater than zero")
        check(0.0 <= self.temperature <= MAX_TEMPERATURE, "temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(is_int(self.top_k, 0), "top_k", "must be -1 or 0 (disable), or a positive 64-bit integer")
        check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        if self.max_tokens is not None:
            check(is_int(self.max_tokens, 1), "max_tokens", "must be an integer of at least 1")
        check(is_int(self.min_tokens, 0), "min_tokens", "must be an integer greater than or equal to 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None:
            check(is_int(self.logprobs, -1), "logprobs",
                  "must be non-negative, or -1 for the whole vocabulary")
        if self.prompt_logprobs is not None:
            check(
                is_int(self.prompt_logprobs, -1),
                "prompt_logprobs",
                "must be non-negative, or -1 for the whole vocabulary",
            )
        if self.seed is not None:
            check(is_int(self.seed), "seed", "must be a 64-bit integer")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"stop cannot contain an empty string, got {self.stop!r}.")
        if any(not is_int(t, 0) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative 64-bit integers, got {_short(self.stop_token_ids)}.")
        if self.allowed_token_ids is not None:
            if len(self.allowed_token_ids) == 0:
                raise ValueError("allowed_token_ids must not be empty.")
            if any(not is_int(t, 0) for t in self.allowed_token_ids):
                raise ValueError(f"allowed_token_ids must be non-negative 64-bit integers, got {_short(self.allowed_token_ids)}.")
        if self.logit_bias is not None and any(not is_int(t, 0) for t in self.logit_bias):
            raise ValueError(f"logit_bias keys must be non-negative 64-bit token ids, got {_short(list(self.logit_bias))}.")

    def verify_vocab(self, vocab_size: int) -> None:
        """Reject token ids the model cannot produce (checked when the request is added)."""
        for name, ids in (
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("logit_bias", list((self.logit_bias or {}).keys())),
            ("stop_token_ids", self.stop_token_ids),
        ):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name} contains token ids out of vocabulary (size {vocab_size}): {bad[:5]}")

    @property
    def sampling_type_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def clone(self) -> "SamplingParams":
        from copy import deepcopy

        return deepcopy(self)


def _short(value: Any, limit: int = 80) -> str:
    """A value for an error message, cut so that a huge list never becomes a huge message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
