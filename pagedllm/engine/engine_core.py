"""`EngineCore`: the engine's busy loop, run in a background thread or in a process of its own.

The loop owns the (synchronous, single-threaded) `LLMEngine`. It takes commands (add, abort,
a request for an engine-state snapshot, shutdown) from an inbox, runs one step whenever there is
work, and hands back one `EngineCoreOutputs` per iteration: the step's outputs, the requests that
failed, a snapshot of the engine's counters for /metrics, and the engine state when it was asked
for (for /v1/engine/state and the dashboard). The same loop runs behind a `queue.Queue` (thread) or a
pipe (process); `AsyncLLM` is the asyncio side of both.

A request that makes a step fail is failed on its own and the loop carries on; only an error the
loop cannot recover from (or a dying process) ends it, and then it says so in its last message.
"""

from __future__ import annotations

import os
import queue
import signal
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Callable, Optional, Union

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.engine_state import EngineState
from pagedllm.engine.llm_engine import LLMEngine, PromptType
from pagedllm.executor.abstract import ExecutorDeadError
from pagedllm.logger import init_logger
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = init_logger(__name__)


# ----- the messages -------------------------------------------------------------------
@dataclass
class AddRequest:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    arrival_time: Optional[float] = None


@dataclass
class AbortRequests:
    request_ids: list[str]
    # Set when the abort is the server's decision (shutdown), not the client's: the requests
    # are then reported back as failed so their callers get an answer.
    reason: Optional[str] = None


@dataclass
class GetEngineState:
    """Ask for an `EngineState` snapshot; it comes back in the iteration's `EngineCoreOutputs`."""


@dataclass
class Shutdown:
    pass


EngineCommand = Union[AddRequest, AbortRequests, GetEngineState, Shutdown]


@dataclass
class RequestError:
    """A request the engine gave up on: 400 for bad input it caught, 500 for its own failures."""

    request_id: str
    message: str
    status_code: int


@dataclass
class EngineStats:
    """What /metrics shows of the engine, as of the end of the last loop iteration."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


@dataclass
class EngineCoreOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)
    stats: Optional[EngineStats] = None
    # Answers a GetEngineState: the state after this iteration's step, or why it could not be taken.
    engine_state: Optional[EngineState] = None
    engine_state_error: Optional[str] = None
    dead: Optional[str] = None  # the engine stopped for good; why


class EngineDeadError(RuntimeError):
    """The engine loop has stopped: no request can be served any more."""


# ----- the loop -----------------------------------------------------------------------
# A step that fails this many times in a row, each time after its requests were failed, means
# the engine itself is broken rather than one request.
_MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineCore:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._consecutive_failures = 0

    def run_busy_loop(self, get_commands: Callable[[bool], list[EngineCommand]],
                      put: Callable[[EngineCoreOutputs], None]) -> None:
        """Serve until a `Shutdown` command; an exception escaping here means the engine is dead.

        `get_commands(block)` returns the pending commands, waiting for at least one when
        `block` is true (the engine has nothing else to do).
        """
        while True:
            result, stop = self.run_iteration(get_commands(not self.engine.has_unfinished_requests()))
            put(result)
            if stop:
                return

    def run_iteration(self, commands: list[EngineCommand]) -> tuple[EngineCoreOutputs, bool]:
        """Apply the commands, run one step if there is work; True as well after a `Shutdown`.

        One iteration of the loop, callable on its own by a front end that drives the loop
        remotely (a Ray actor's method).
        """
        result = EngineCoreOutputs()
        state_asked = False
        for command in commands:
            if isinstance(command, Shutdown):
                self._abort(self._unfinished_request_ids(), "the server is shutting down", result)
                result.stats = self.stats()
                return result, True
            if isinstance(command, AddRequest):
                self._add(command, result)
            elif isinstance(command, GetEngineState):
                state_asked = True
            else:
                self._abort(command.request_ids, command.reason, result)
        if self.engine.has_unfinished_requests():
            result.outputs = self._step(result)
        result.stats = self.stats()
        if state_asked:
            self._snapshot(result)
        return result, False

    def _snapshot(self, result: EngineCoreOutputs) -> None:
        try:
            result.engine_state = self.engine.get_engine_state()
        except Exception as e:  # a view of the engine must never stop it
            logger.exception("taking the engine-state snapshot failed")
            result.engine_state_error = f"could not take the engine-state snapshot: {e!r}"

    def _add(self, command: AddRequest, result: EngineCoreOutputs) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
        except ValueError as e:
            result.errors.append(RequestError(command.request_id, str(e), 400))
        except Exception as e:  # the request must not take the loop down with it
            logger.exception("adding request %s failed", command.request_id)
            self.engine.abort_request(command.request_id)
            result.errors.append(RequestError(command.request_id, f"the engine could not add the request: {e}", 500))

    def _abort(self, request_ids: list[str], reason: Optional[str], result: EngineCoreOutputs) -> None:
        self.engine.abort_request(request_ids)
        if reason is not None:
            result.errors.extend(RequestError(rid, reason, 503) for rid in request_ids)

    def _step(self, result: EngineCoreOutputs) -> list[RequestOutput]:
        try:
            outputs = self.engine.step()
        except ExecutorDeadError as e:  # a worker is gone: no later step can succeed
            raise EngineDeadError(str(e)) from e
        except Exception as e:
            self._consecutive_failures += 1
            if self._consecutive_failures >= _MAX_CONSECUTIVE_STEP_FAILURES:
                raise EngineDeadError(f"the engine step failed {self._consecutive_failures} times in a row: {e}") from e
            # Blame the requests that were running: the step was theirs. Aborting them frees
            # their blocks, which puts the scheduler and the KV cache back in a clean state.
            victims = self._running_request_ids() or self._unfinished_request_ids()
            logger.exception("engine step failed; failing %d request(s) and carrying on", len(victims))
            self.engine.abort_request(victims)
            result.errors.extend(RequestError(rid, f"the engine failed while running this request: {e!r}", 500)
                                 for rid in victims)
            self._check_idle_invariant()
            return []
        self._consecutive_failures = 0
        return outputs

    def _running_request_ids(self) -> list[str]:
        parents = self.engine.output_processor.child_to_parent
        running = {parents[r.request_id][0] for r in self.engine.scheduler.running if r.request_id in parents}
        return sorted(running)

    def _unfinished_request_ids(self) -> list[str]:
        return list(self.engine.output_processor.parents)

    def _check_idle_invariant(self) -> None:
        """With no request left, every KV block must be free; if not, the engine cannot be trusted."""
        if not self.engine.has_unfinished_requests() and self.engine.kv_cache_manager.usage() > 0:
            raise EngineDeadError("KV-cache blocks are still in use with no request left after a failed step")

    def stats(self) -> EngineStats:
        s, c = self.engine.scheduler.stats(), self.engine.counters
        return EngineStats(s.num_running, s.num_waiting, s.kv_cache_usage, s.num_preemptions,
                           s.prefix_cache_queries, s.prefix_cache_hits, c.prompt_tokens, c.generation_tokens)


# ----- the two homes of the loop --------------------------------------------------------
def run_in_thread(core: EngineCore, inbox: "queue.Queue[EngineCommand]",
                  put: Callable[[EngineCoreOutputs], None]) -> None:
    """Thread target: the loop fed from a `queue.Queue`; its death is reported, never silent."""

    def get_commands(block: bool) -> list[EngineCommand]:
        commands = [inbox.get()] if block else []
        while True:
            try:
                commands.append(inbox.get_nowait())
            except queue.Empty:
                return commands

    try:
        core.run_busy_loop(get_commands, put)
    except BaseException as e:  # noqa: BLE001 - whatever it was, the engine is gone
        logger.exception("the engine loop died")
        put(EngineCoreOutputs(dead=f"{type(e).__name__}: {e}"))


@dataclass
class EngineInfo:
    """What the front end needs to know about an engine that lives in another process."""

    max_model_len: int
    vocab_size: int


def run_engine_core_process(engine_args: EngineArgs, model_path: str, conn: Connection,
                            cuda_visible_devices: Optional[str] = None) -> None:
    """Process target: build the engine, report ready (or the error), then serve over `conn`.

    `cuda_visible_devices` gives a data-parallel replica its own GPUs (set before CUDA starts).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when to stop
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    try:
        engine = LLMEngine.from_engine_args(engine_args, model_path)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{e}", isinstance(e, ValueError)))
        return
    mc = engine.config.model_config
    conn.send(("ready", EngineInfo(mc.max_model_len, mc.vocab_size)))

    def get_commands(block: bool) -> list[EngineCommand]:
        commands: list[EngineCommand] = []
        try:
            if block:
                commands.append(conn.recv())
            while conn.poll():
                commands.append(conn.recv())
        except (EOFError, OSError):  # the front end is gone
            commands.append(Shutdown())
        return commands

    def put(out: EngineCoreOutputs) -> None:
        try:
            conn.send(out)
        except (BrokenPipeError, OSError):
            pass

    try:
        EngineCore(engine).run_busy_loop(get_commands, put)
    except BaseException as e:  # noqa: BLE001
        logger.exception("the engine loop died")
        put(EngineCoreOutputs(dead=f"{type(e).__name__}: {e}"))
    finally:
        engine.shutdown()
