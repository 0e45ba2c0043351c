"""What a request is on each side of the engine core: `EngineCoreRequest` crosses from a frontend
into the core, `Request` is the scheduling state the core keeps for it.

Both sides import this module and nothing here imports them: the frontend (input processor,
output processor) builds `EngineCoreRequest`s; the core (scheduler, KV-cache manager) works on
`Request`s. A user request with `n > 1` is fanned out by the frontend into `n` core requests
(see `engine/parent_request.py`), which share their prompt's KV blocks through the prefix cache.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Optional

from pagedllm.pooling_params import PoolingParams
from pagedllm.lora.request import LoRARequest
from pagedllm.multimodal.inputs import MultiModalFeature
from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self.value >= RequestStatus.FINISHED_STOPPED.value

    @property
    def finish_reason(self) -> Optional[str]:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH_CAPPED: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass
class EngineCoreRequest:
    """One sequence, tokenized and validated: all the core needs, and nothing it must check again.

    `sampling_params` already carries the model's end-of-sequence ids (`all_stop_token_ids`) and
    `n == 1`; `max_tokens` is already capped so that prompt + output fit in `max_model_len`.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    arrival_time: float
    # With a reasoning parser and a structured-output constraint: the token that ends the reasoning,
    # after which the constraint applies (None: it applies from the first token).
    reasoning_end_token_id: Optional[int] = None
    # A pooling request (embed, classify, score): its prompt runs once, whole, and it ends with the pooled
    # vector instead of a token. `sampling_params` then only carries max_tokens=1 and is never sampled with.
    pooling_params: Optional[PoolingParams] = None
    lora_request: Optional[LoRARequest] = None  # None: the base model
    # A vision-language model's images, in prompt order, each with its placeholder run in prompt_token_ids.
    mm_features: Optional[list[MultiModalFeature]] = None


class Request:
    """A sequence: its tokens, how many of them have KV in the cache, and its block hashes.

    Invariant: `num_computed_tokens <= num_tokens`; tokens past `num_computed_tokens` are
    what the scheduler still has to feed through the model (a prompt remainder, the last
    sampled token, or everything again after a preemption).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        block_size: int,
        arrival_time: Optional[float] = None,
        reasoning_end_token_id: Optional[int] = None,
        pooling_params: Optional[PoolingParams] = None,
        lora_request: Optional[LoRARequest] = None,
        mm_features: Optional[list[MultiModalFeature]] = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens  # already capped by max_model_len
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit on first admission; -1 until then
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.block_size = block_size
        self.lora_request = lora_request
        self.mm_features: list[MultiModalFeature] = mm_features or []
        self.block_hashes: list[tuple] = []
        self._update_block_hashes()
        self.reasoning_end_token_id = reasoning_end_token_id
        self.pooling_params = pooling_params
        self.pooler_output: Optional[Any] = None  # the pooled vector (a CPU tensor), once computed
        # Set by the engine core's StructuredOutputManager for a request with a constraint.
        self.structured_output_request: Optional[Any] = None
        # Speculative decoding: tokens proposed to follow all_token_ids, verified in the next step. They are
        # never part of all_token_ids, so block hashes and the prefix cache only ever cover accepted tokens.
        self.spec_token_ids: list[int] = []

    @classmethod
    def from_engine_core_request(cls, request: EngineCoreRequest, block_size: int) -> "Request":
        return cls(request.request_id, request.prompt_token_ids, request.sampling_params, request.max_tokens,
                   block_size, request.arrival_time, request.reasoning_end_token_id, request.pooling_params,
                   request.lora_request, request.mm_features)

    @property
    def lora_int_id(self) -> int:
        """The adapter this request runs with (0: the base model)."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.num_tokens % self.block_size == 0:
            self._update_block_hashes()

    def _update_block_hashes(self) -> None:
        """Hash every newly full block, chained on its parent so a hash names a whole prefix.

        The key keeps the block's tokens next to the parent's hash, so two different
        prefixes can only collide if their parents' 64-bit hashes do. The first block's parent is
        the LoRA adapter's id (None for the base model): the same tokens give different K/V under
        different adapters, so their blocks must never be shared. A block holding image placeholders
        also keys on those images' hashes: the placeholder tokens are the same for every image.
        """
        bs = self.block_size
        for i in range(len(self.block_hashes), self.num_tokens // bs):
            parent = hash(self.block_hashes[i - 1]) if i else (self.lora_int_id or None)
            key = (parent, tuple(self.all_token_ids[i * bs : (i + 1) * bs]))
            images = tuple(f.identifier for f in self.mm_features if f.overlaps(i * bs, (i + 1) * bs))
            self.block_hashes.append(key + (images,) if images else key)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
