"""`AsyncLLM`: the engine behind an asyncio front end, as vLLM's server uses it.

`generate()` is an async generator of DELTA `RequestOutput`s. The engine loop (`EngineCore`) runs
in a process of its own (`engine_process=True`, vLLM v1's layout and what `pagedllm serve` uses) or
in a background thread of this process; either way the asyncio side only puts commands in a queue
and receives each step's outputs through `loop.call_soon_threadsafe`, so HTTP handling,
tokenisation and JSON overlap with model steps. In a thread they still share the GIL with the
engine's Python; `docs/serving.md` has the measurements. (A script that builds an AsyncLLM with
`engine_process=True` needs the usual `if __name__ == "__main__":` guard of multiprocessing.)

Leaving a `generate()` early (a client that disconnects) aborts the request in the engine, which
frees its KV blocks at once. If the engine loop dies, every waiting caller gets an
`EngineDeadError` and new requests fail fast.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Callable, Optional, Union

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.engine_core import (
    AbortRequests,
    AddRequest,
    EngineCommand,
    EngineCore,
    EngineCoreOutputs,
    EngineDeadError,
    EngineStats,
    GetEngineState,
    Shutdown,
    run_engine_core_process,
    run_in_thread,
)
from pagedllm.engine.engine_state import EngineState
from pagedllm.engine.llm_engine import LLMEngine, PromptType
from pagedllm.engine.tokenizer import load_generation_config, load_tokenizer, sampling_defaults
from pagedllm.logger import init_logger
from pagedllm.outputs import RequestOutput
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

    def put(self, item: Union[RequestOutput, Exception]) -> None:
        if isinstance(item, RequestOutput):
            self._record(item)
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

    def __init__(self, engine_args: EngineArgs, model_path: str, engine_process: bool = False) -> None:
        self.engine_args = engine_args
        self.model_path = model_path
        self.engine_process = engine_process
        self.stat_loggers: list[Callable[[RequestStats], None]] = []
        self._streams: dict[str, RequestStream] = {}
        self._stats = EngineStats()
        self._dead: Optional[str] = None
        self._shutting_down = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._threads: list[threading.Thread] = []
        self._engine: Optional[LLMEngine] = None
        # Callers waiting for the engine-state snapshot in flight (one request serves them all).
        self._state_waiters: list[asyncio.Future] = []
        if engine_process:
            self._start_process()
            self.tokenizer = load_tokenizer(engine_args.tokenizer or model_path)
            self.default_sampling_overrides = sampling_defaults(load_generation_config(model_path))
        else:
            self._engine = LLMEngine.from_engine_args(engine_args, model_path)
            self._inbox: queue.Queue[EngineCommand] = queue.Queue()
            self.tokenizer = self._engine.tokenizer
            mc = self._engine.config.model_config
            self.max_model_len, self.vocab_size = mc.max_model_len, mc.vocab_size
            self.default_sampling_overrides = dict(self._engine.default_sampling_overrides)

    def _start_process(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=run_engine_core_process, name="pagedllm-engine-core",
                                    args=(self.engine_args, self.model_path, child_conn), daemon=True)
        self._process.start()
        child_conn.close()
        try:
            message = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process died while starting (exit code {self._process.exitcode})")
        if message[0] == "failed":
            self._process.join(10)
            raise (ValueError if message[2] else RuntimeError)(message[1])
        info = message[1]
        self.max_model_len, self.vocab_size = info.max_model_len, info.vocab_size
        self._outbox: queue.Queue[Optional[EngineCommand]] = queue.Queue()

    # ----- life cycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Bind to the running event loop and start the engine loop (or the threads that talk to it)."""
        self._loop = asyncio.get_running_loop()
        if self.engine_process:
            targets: list[tuple[Callable[[], None], str]] = [
                (self._send_to_process, "pagedllm-engine-sender"),
                (self._receive_from_process, "pagedllm-engine-receiver"),
            ]
        else:
            core = EngineCore(self._engine)
            targets = [(lambda: run_in_thread(core, self._inbox, self._post), "pagedllm-engine-core")]
        for target, name in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine loop: requests still running are failed with a 503."""
        self._shutting_down = True
        if self._dead is None:
            self._send(Shutdown())
        loop = asyncio.get_running_loop()
        if self.engine_process:
            await loop.run_in_executor(None, self._process.join, timeout)
            if self._process.is_alive():
                self._process.kill()
            self._outbox.put(None)
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join, timeout)
        if self._engine is not None:
            self._engine.shutdown()
        self._dead = self._dead or "the engine was shut down"
        self._answer_state_waiters(None, None)

    # ----- requests -------------------------------------------------------------------
    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's DELTA outputs until it finishes; closing early aborts it."""
        self.check_health()
        if request_id in self._streams:
            raise RequestFailedError(f"request id {request_id!r} is already in use", 400)
        params = params.clone()
        params.output_kind = RequestOutputKind.DELTA
        stream = RequestStream(time.monotonic())
        self._streams[request_id] = stream
        self._send(AddRequest(request_id, prompt, params, stream.stats.arrival_time))
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            if finished:
                for stat_logger in self.stat_loggers:
                    stat_logger(stream.stats)
            elif self._dead is None:
                self._send(AbortRequests([request_id]))

    def abort_all(self, reason: str) -> None:
        """Fail every request in flight with `reason` (a 503), e.g. when shutdown's grace period ends."""
        if self._streams and self._dead is None:
            self._send(AbortRequests(list(self._streams), reason))

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running ({self._dead})")

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def get_stats(self) -> EngineStats:
        return self._stats

    async def get_engine_state(self, timeout: float = 30.0) -> EngineState:
        """A snapshot from the engine loop, taken after its current step (raises EngineDeadError)."""
        self.check_health()
        future = asyncio.get_running_loop().create_future()
        self._state_waiters.append(future)
        if len(self._state_waiters) == 1:
            self._send(GetEngineState())
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise RequestFailedError(f"the engine did not answer within {timeout:.0f} s", 503) from None
        finally:
            if future in self._state_waiters:  # timed out or cancelled: the next caller asks anew
                self._state_waiters.remove(future)

    @property
    def num_requests_in_flight(self) -> int:
        return len(self._streams)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ----- plumbing -------------------------------------------------------------------
    def _send(self, command: EngineCommand) -> None:
        (self._outbox if self.engine_process else self._inbox).put(command)

    def _post(self, outputs: EngineCoreOutputs) -> None:
        """Called from the engine's side: hand one iteration's results to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _dispatch(self, outputs: EngineCoreOutputs) -> None:
        if outputs.stats is not None:
            self._stats = outputs.stats
        if outputs.engine_state is not None or outputs.engine_state_error is not None:
            self._answer_state_waiters(outputs.engine_state, outputs.engine_state_error)
        for output in outputs.outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)
        for error in outputs.errors:
            stream = self._streams.get(error.request_id)
            if stream is not None:
                stream.put(RequestFailedError(error.message, error.status_code))
        if outputs.dead is not None and self._dead is None:
            self._dead = outputs.dead
            logger.error("The engine died (%s); failing %d request(s) in flight", outputs.dead, len(self._streams))
            for stream in self._streams.values():
                stream.put(EngineDeadError(f"the engine died: {outputs.dead}"))
            self._answer_state_waiters(None, None)
            self._stats = EngineStats()

    def _answer_state_waiters(self, state: Optional[EngineState], error: Optional[str]) -> None:
        waiters, self._state_waiters = self._state_waiters, []
        for future in waiters:
            if future.done():
                continue
            if state is not None:
                future.set_result(state)
            elif error is not None:
                future.set_exception(RequestFailedError(error, 500))
            else:
                future.set_exception(EngineDeadError(f"the engine is not running ({self._dead})"))

    def _send_to_process(self) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self._conn.send(command)
            except (BrokenPipeError, OSError):
                return

    def _receive_from_process(self) -> None:
        while True:
            try:
                outputs = self._conn.recv()
            except (EOFError, OSError):
                if not self._shutting_down:
                    self._process.join(1)
                    self._post(EngineCoreOutputs(dead=f"the engine process exited (code {self._process.exitcode})"))
                return
            self._post(outputs)
            if outputs.dead is not None:
                return
