"""`AsyncLLM`: the server's frontend, an asyncio face on one or more engine cores.

Like `LLMEngine` it owns the tokenizer and the input and output processors, in the server's
process; the engine core (scheduler, KV cache, model) runs its busy loop in a process of its own
(`engine_process=True`, vLLM v1's layout and what `pagedllm serve` uses) or in a background
thread, behind an asynchronous client (`engine/core_client.py`). The asyncio side only puts
commands in a queue and receives each loop iteration's `EngineCoreOutputs` through
`loop.call_soon_threadsafe`; turning them into text (detokenization, stop strings) happens on the
event loop, and a stop string ends the sequence in its core with an abort.

`process_request` checks a request (a `ValueError` for bad input, before anything is sent) and
`stream` runs it, yielding DELTA `RequestOutput`s; `generate` does both. Leaving a stream early (a
client that disconnects) aborts the request in the engine, which frees its KV blocks at once.

With `data_parallel_size=M` there are M engine cores (replicas, each with its own KV cache and,
under tensor parallelism, its own workers), one client each; a new request goes to the replica
with the fewest requests in flight, and its aborts follow it there. With
`distributed_executor_backend="ray"` the replicas are Ray actors placed on a cluster's nodes.
If an engine loop dies, every waiting caller gets an `EngineDeadError` and new requests fail fast.
(A script that builds an AsyncLLM with `engine_process=True` needs the usual
`if __name__ == "__main__":` guard of multiprocessing.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Callable, Optional, Union

from pagedllm.config import EngineConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core_client import AsyncEngineCoreClient, LoadBalancer, RayClient, make_async_clients
from pagedllm.engine.core_messages import (
    AbortRequests,
    AddRequests,
    EngineCoreOutputs,
    EngineDeadError,
    GetEngineState,
    Shutdown,
)
from pagedllm.engine.engine_state import EngineState
from pagedllm.engine.input_processor import InputProcessor, ProcessedRequest, PromptType
from pagedllm.engine.metrics import EngineStats, StatLogger
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.tokenizer import load_generation_config, load_tokenizer
from pagedllm.logger import init_logger
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import PoolingRequestOutput, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.request import RequestStatus
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

logger = init_logger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "RequestFailedError", "RequestStats"]


class RequestFailedError(RuntimeError):
    """The engine rejected or failed one request; `status_code` is the HTTP status it deserves."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass
class RequestStats:
    """Timings of one finished request, measured where its outputs arrive (for the histograms)."""

    arrival_time: float
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    inter_token_latencies: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> Optional[float]:
        return None if self.last_token_time is None else self.last_token_time - self.arrival_time


class RequestStream:
    """One request's mailbox. A consumer that falls behind gets the pending deltas merged into one."""

    def __init__(self, arrival_time: float) -> None:
        self._item: Union[RequestOutput, Exception, None] = None
        self._ready = asyncio.Event()
        self.stats = RequestStats(arrival_time)

    def put(self, item: Union[RequestOutput, PoolingRequestOutput, Exception]) -> None:
        if isinstance(item, RequestOutput):
            self._record(item)
        elif isinstance(item, PoolingRequestOutput):  # one output, whole: its prompt ran once
            self.stats.num_prompt_tokens = len(item.prompt_token_ids)
            self.stats.last_token_time = time.monotonic()
            self.stats.finish_reason = "stop"
        if self._item is None or isinstance(item, Exception):
            self._item = item
        elif isinstance(self._item, RequestOutput):
            _merge_delta(self._item, item)
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        item, self._item = self._item, None
        self._ready.clear()
        if isinstance(item, Exception):
            raise item
        return item

    def _record(self, output: RequestOutput) -> None:
        now = time.monotonic()
        s = self.stats
        new_tokens = sum(len(o.token_ids) for o in output.outputs)
        if new_tokens:
            if s.first_token_time is None:
                s.first_token_time = now
                s.num_prompt_tokens = len(output.prompt_token_ids)
            else:
                s.inter_token_latencies.append(now - s.last_token_time)
            s.last_token_time = now
            s.num_generation_tokens += new_tokens
        if output.finished:
            s.last_token_time = now
            reasons = {o.finish_reason for o in output.outputs if o.finish_reason}
            s.finish_reason = "length" if "length" in reasons else (reasons.pop() if reasons else None)


def _merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    by_index = {o.index: o for o in into.outputs}
    for o in new.outputs:
        old = by_index.get(o.index)
        if old is None:
            into.outputs.append(o)
            continue
        old.text += o.text
        old.token_ids = old.token_ids + o.token_ids
        if o.logprobs is not None:
            old.logprobs = (old.logprobs or []) + o.logprobs
        old.cumulative_logprob = o.cumulative_logprob
        old.finish_reason, old.stop_reason = o.finish_reason, o.stop_reason
    if into.prompt_logprobs is None:
        into.prompt_logprobs = new.prompt_logprobs
    into.finished = new.finished


class AsyncLLM:
    """An engine for an asyncio server. Build it, `await start()` inside the loop, then `generate()`."""

    def __init__(self, config: EngineConfig, engine_process: bool = False, log_stats: bool = True) -> None:
        self.config = config
        mc = config.model_config
        self.max_model_len, self.vocab_size = mc.max_model_len, mc.vocab_size
        self.tokenizer = load_tokenizer(mc.tokenizer)
        self.input_processor = InputProcessor(mc, self.tokenizer, load_generation_config(mc.generation_config),
                                              config.lora_config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stat_loggers: list[Callable[[RequestStats], None]] = []
        self._streams: dict[str, RequestStream] = {}
        self._engine_of: dict[str, int] = {}  # request id -> the replica serving it
        self._dead: Optional[str] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.engine_cores: list[AsyncEngineCoreClient] = make_async_clients(config, engine_process)
        self._balancer = LoadBalancer(len(self.engine_cores))
        self._stats = [EngineStats() for _ in self.engine_cores]
        self._stat_loggers = [StatLogger() if log_stats else None for _ in self.engine_cores]
        # Per replica, the callers waiting for the engine-state snapshot in flight (one request serves them all).
        self._state_waiters: dict[int, list[asyncio.Future]] = {i: [] for i in range(len(self.engine_cores))}

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, engine_process: bool = False) -> "AsyncLLM":
        return cls(engine_args.create_engine_config(), engine_process, log_stats=not engine_args.disable_log_stats)

    @property
    def data_parallel_size(self) -> int:
        return len(self.engine_cores)

    @property
    def default_sampling_overrides(self) -> dict:
        return self.input_processor.default_sampling_overrides

    # ----- life cycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Bind to the running event loop and start the engine loops (or the threads that talk to them)."""
        self._loop = asyncio.get_running_loop()
        for index, client in enumerate(self.engine_cores):
            client.start(lambda outputs, index=index: self._post(index, outputs))

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine loops: requests still running are failed with a 503."""
        loop = asyncio.get_running_loop()
        for client in self.engine_cores:
            if self._dead is None:
                client.send(Shutdown())
        await asyncio.gather(*(loop.run_in_executor(None, client.shutdown, timeout) for client in self.engine_cores))
        if any(isinstance(client, RayClient) for client in self.engine_cores):
            from pagedllm.executor.ray_utils import shutdown_ray

            shutdown_ray()
        self._dead = self._dead or "the engine was shut down"
        for engine in self._state_waiters:
            self._answer_state_waiters(engine, None, None)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine loops without an event loop (after `shutdown`, or when the server failed to
        start and never ran it): no engine process is left behind."""
        for client in self.engine_cores:
            client.send(Shutdown())
            client.shutdown(timeout)

    # ----- requests -------------------------------------------------------------------
    def process_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                        max_tokens_param: Optional[str] = None,
                        lora_request: Optional[LoRARequest] = None) -> ProcessedRequest:
        """Check and prepare a request (`InputProcessor.process`), raising `ValueError` for bad
        input; nothing reaches the engine until `stream` runs it."""
        if request_id in self._streams:
            raise RequestFailedError(f"request id {request_id!r} is already in use", 400)
        params = params.clone()
        params.output_kind = RequestOutputKind.DELTA
        return self.input_processor.process(request_id, prompt, params, max_tokens_param=max_tokens_param,
                                            lora_request=lora_request)

    def process_pooling_request(self, request_id: str, prompt: PromptType,
                                params: PoolingParams) -> ProcessedRequest:
        """Check and prepare a pooling request (`InputProcessor.process_pooling`), raising `ValueError` for
        bad input; nothing reaches the engine until `encode` runs it."""
        if request_id in self._streams:
            raise RequestFailedError(f"request id {request_id!r} is already in use", 400)
        return self.input_processor.process_pooling(request_id, prompt, params)

    async def encode(self, request: ProcessedRequest) -> PoolingRequestOutput:
        """Run a processed pooling request to its one output; cancelling the caller aborts it."""
        async with contextlib.aclosing(self.stream(request)) as outputs:
            async for output in outputs:
                if output.finished:
                    return output
        raise RequestFailedError("the pooling request ended without an output", 500)

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's DELTA outputs until it finishes; closing early aborts it.

        The inner stream is closed with this generator (`aclosing`), not whenever the garbage
        collector gets to it, so an early close aborts the request at once."""
        async with contextlib.aclosing(self.stream(self.process_request(request_id, prompt, params))) as outputs:
            async for output in outputs:
                yield output

    async def stream(self, request: ProcessedRequest) -> AsyncGenerator[RequestOutput, None]:
        """Run a processed request, yielding its DELTA outputs until it finishes; closing early aborts it."""
        self.check_health()
        request_id = request.request_id
        if request_id in self._streams:
            raise RequestFailedError(f"request id {request_id!r} is already in use", 400)
        stream = RequestStream(time.monotonic())
        self.output_processor.add_request(request)
        self._streams[request_id] = stream
        engine = self._engine_of[request_id] = self._balancer.acquire()
        self.engine_cores[engine].send(AddRequests(request.core_requests))
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            self._balancer.release(self._engine_of.pop(request_id))
            sequences = self.output_processor.abort_requests([request_id])
            if finished:
                for stat_logger in self.stat_loggers:
                    stat_logger(stream.stats)
            elif self._dead is None and sequences:
                self.engine_cores[engine].send(AbortRequests(sequences))

    def abort_all(self, reason: str) -> None:
        """Fail every request in flight with `reason` (a 503), e.g. when shutdown's grace period ends."""
        if not self._streams or self._dead is not None:
            return
        requests = self.output_processor.requests
        for engine, client in enumerate(self.engine_cores):
            ids = [seq for request_id, e in self._engine_of.items() if e == engine and request_id in requests
                   for seq in requests[request_id].child_ids]
            if ids:
                client.send(AbortRequests(ids, error=reason))

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running ({self._dead})")

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def get_engine_stats(self) -> list[EngineStats]:
        """One snapshot per data-parallel replica, in replica order."""
        return list(self._stats)

    async def get_engine_state(self, engine: int = 0, timeout: float = 30.0) -> EngineState:
        """A snapshot from replica `engine`'s loop, taken after its current step (raises EngineDeadError)."""
        self.check_health()
        if not 0 <= engine < len(self.engine_cores):
            raise RequestFailedError(f"engine must be in 0..{len(self.engine_cores) - 1}, got {engine}", 400)
        future = asyncio.get_running_loop().create_future()
        waiters = self._state_waiters[engine]
        waiters.append(future)
        if len(waiters) == 1:
            self.engine_cores[engine].send(GetEngineState())
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise RequestFailedError(f"the engine did not answer within {timeout:.0f} s", 503) from None
        finally:
            if future in self._state_waiters[engine]:  # timed out or cancelled: the next caller asks anew
                self._state_waiters[engine].remove(future)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ----- plumbing -------------------------------------------------------------------
    def _post(self, engine: int, outputs: EngineCoreOutputs) -> None:
        """Called from a client's thread: hand one iteration's results to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._dispatch, engine, outputs)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _dispatch(self, engine: int, outputs: EngineCoreOutputs) -> None:
        """On the event loop: one iteration's outputs turned into text and handed to their streams."""
        if outputs.stats is not None:
            self._stats[engine] = outputs.stats
            stat_logger = self._stat_loggers[engine]
            if stat_logger is not None and outputs.outputs:
                stat_logger.maybe_log(outputs.stats)
        if outputs.engine_state is not None or outputs.engine_state_error is not None:
            state = outputs.engine_state
            if state is not None:
                state = state.with_parent_ids(self.output_processor.parent_of)
            self._answer_state_waiters(engine, state, outputs.engine_state_error)
        processed = self.output_processor.process_outputs(outputs.outputs)
        for output in processed.request_outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)
        if processed.reqs_to_abort and self._dead is None:  # stop strings: the core ends them before its next step
            self.engine_cores[engine].send(AbortRequests(processed.reqs_to_abort, RequestStatus.FINISHED_STOPPED))
        failed: dict[str, RequestFailedError] = {}
        for error in outputs.errors:
            failed.setdefault(self.output_processor.parent_of(error.request_id),
                              RequestFailedError(error.message, error.status_code))
        for request_id, error in failed.items():
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(error)
            sequences = self.output_processor.abort_requests([request_id])
            if sequences and self._dead is None:  # its other sequences, if the core still runs them
                self.engine_cores[engine].send(AbortRequests(sequences))
        if outputs.dead is not None and self._dead is None:
            # One replica gone is the server's failure, loudly: the others are stopped too.
            name = f"engine {engine}: " if len(self.engine_cores) > 1 else ""
            self._dead = f"{name}{outputs.dead}"
            logger.error("The engine died (%s); failing %d request(s) in flight", self._dead, len(self._streams))
            for stream in self._streams.values():
                stream.put(EngineDeadError(f"the engine died: {self._dead}"))
            for other, client in enumerate(self.engine_cores):
                if other != engine:
                    client.send(Shutdown())
            for waiting in self._state_waiters:
                self._answer_state_waiters(waiting, None, None)
            self._stats = [EngineStats() for _ in self.engine_cores]

    def _answer_state_waiters(self, engine: int, state: Optional[EngineState], error: Optional[str]) -> None:
        waiters, self._state_waiters[engine] = self._state_waiters[engine], []
        for future in waiters:
            if future.done():
                continue
            if state is not None:
                future.set_result(state)
            elif error is not None:
                future.set_exception(RequestFailedError(error, 500))
            else:
                future.set_exception(EngineDeadError(f"the engine is not running ({self._dead})"))
