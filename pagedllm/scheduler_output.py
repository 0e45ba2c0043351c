"""The one message between deciding and doing, and its answer.

The scheduler (`core/scheduler.py`) fills a `SchedulerOutput` from pure Python state; the model
runner (`worker/model_runner.py`) turns it into tensors and returns a `ModelRunnerOutput`. Both are
plain picklable data so that a tensor-parallel worker in another process can receive the same
message. They live outside both rooms so that neither imports the other: the scheduler never
sees a tensor, the runner never decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from pagedllm.lora.request import LoRARequest
from pagedllm.multimodal.inputs import MultiModalFeature
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step: which tokens to run, where their KV goes, what to sample."""

    request_id: str
    token_ids: list[int]  # the tokens fed this step (a prompt chunk, or the last sampled token)
    num_computed_tokens: int  # position of token_ids[0]; KV before it is already cached
    block_ids: list[int]  # the request's block table (logical block i -> physical block)
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far: penalties and min_tokens need them
    sample: bool  # True when this chunk reaches the end of the known tokens
    compute_prompt_logprobs: bool = False
    # A pooling request: this step runs its whole prompt, and the runner pools it instead of sampling.
    pooling_params: Optional[PoolingParams] = None
    lora_request: Optional[LoRARequest] = None  # the adapter its rows run through (None: the base model)
    # The images whose placeholder rows this step's tokens include (only those: pixels travel once per chunk).
    mm_features: list[MultiModalFeature] = field(default_factory=list)
    # A model with local and global layers: one block table per KV-cache group (`model_executor/kv_cache_groups.py`),
    # `block_ids` being the first. Empty when one table serves every layer.
    group_block_ids: tuple[list[int], ...] = ()
    # Speculative decoding: the draft tokens at the end of token_ids, verified this step (their positions
    # follow the request's known tokens; each gets a sampled row, plus the bonus row after them).
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    # Requests that ended since the previous step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Structured outputs: int32 [rows, ceil(vocab / 32)], bit t of a row allowing token t, and the row
    # of each request whose next token its grammar constrains (`structured_output/manager.py`).
    grammar_bitmask: Optional[np.ndarray] = None
    structured_output_request_ids: dict[str, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprobs:
    """Logprobs at one or more positions: row i holds the chosen token first, then the top-k."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[list[int]]


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request id -> (first prompt position covered, logprobs for the following positions)
    prompt_logprobs: dict[str, tuple[int, TokenLogprobs]] = field(default_factory=dict)
    # request id -> its pooled vector (a float32 CPU tensor), for the pooling requests of the step
    pooler_output: dict[str, Any] = field(default_factory=dict)
    # Speculative decoding. request id -> how many of its drafts were accepted: the step emits those drafts,
    # then sampled_token_ids' token (logprobs then have one row per emitted token).
    num_accepted_tokens: dict[str, int] = field(default_factory=dict)
    # request id -> the drafts proposed for its next step (after this step's tokens)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
