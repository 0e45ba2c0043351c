"""What travels between a frontend and an engine core: commands in, `EngineCoreOutputs` out.

Plain picklable data, the same whether the core runs in this process (offline `LLMEngine`), in a
background thread, in a process of its own (the server, vLLM v1's layout) or in a Ray actor. The
core never sees text: requests come in tokenized and validated (`EngineCoreRequest`), and what
comes out is token ids, logprobs as ids, and finish reasons; the frontend's output processor
turns them into `RequestOutput`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pagedllm.engine.engine_state import EngineState
from pagedllm.engine.metrics import EngineStats
from pagedllm.request import EngineCoreRequest, RequestStatus
from pagedllm.scheduler_output import TokenLogprobs


# ----- commands ---------------------------------------------------------------------------
@dataclass
class AddRequests:
    """The sequences of one user request (n of them for n > 1): added together, or not at all."""

    requests: list[EngineCoreRequest]


@dataclass
class AbortRequests:
    """End sequences before the core does: a client that left, or a stop string the frontend found
    (`status=FINISHED_STOPPED`). With `error`, the server ended them (shutdown), and each is
    reported back as failed, so its caller gets an answer."""

    request_ids: list[str]
    status: RequestStatus = RequestStatus.FINISHED_ABORTED
    error: Optional[str] = None


@dataclass
class GetEngineState:
    """Ask for an `EngineState` snapshot; it comes back in the iteration's `EngineCoreOutputs`."""


@dataclass
class Shutdown:
    pass


EngineCommand = Union[AddRequests, AbortRequests, GetEngineState, Shutdown]


# ----- outputs ----------------------------------------------------------------------------
@dataclass
class EngineCoreOutput:
    """What one sequence got in one step: its new token (if one was due), and how it finished."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: Optional[TokenLogprobs] = None
    # (first prompt position covered, logprobs of the following prompt tokens), when asked for
    new_prompt_logprobs: Optional[tuple[int, TokenLogprobs]] = None
    finish_reason: Optional[str] = None  # "stop" or "length" once the core ended it
    stop_reason: Union[int, str, None] = None  # a stop token id that ended it
    # A pooling request's result (a float32 CPU tensor); it comes with finish_reason "stop".
    pooling_output: Optional[Any] = None


@dataclass
class RequestError:
    """A sequence the engine gave up on: 400 for bad input it caught, 500 for its own failures, 503
    when the server is shutting down."""

    request_id: str
    message: str
    status_code: int


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)
    stats: Optional[EngineStats] = None
    # Answers a GetEngineState: the state after this iteration's step, or why it could not be taken.
    engine_state: Optional[EngineState] = None
    engine_state_error: Optional[str] = None
    dead: Optional[str] = None  # the engine stopped for good; why


class EngineDeadError(RuntimeError):
    """The engine loop has stopped: no request can be served any more."""
