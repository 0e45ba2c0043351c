"""The engine core's busy loop, and the three places it can live: a thread, a process, a Ray actor.

The loop takes commands (`AddRequests`, `AbortRequests`, `GetEngineState`, `Shutdown`: see
`engine/core_messages.py`), runs one `EngineCore.step` whenever there is work, and hands back one
`EngineCoreOutputs` per iteration: the step's outputs, the sequences that failed, the engine's
`EngineStats` for /metrics, and the engine state when it was asked for. The async frontend
(`AsyncLLM`) reaches it through `engine/core_client.py`.

A request that makes a step fail is found and failed on its own (`EngineCore.step` runs the failed
step's requests one at a time until the culprit fails alone) and every other request carries on;
only an error the loop cannot recover from (a dead worker, steps that fail whatever runs in them,
or a dying process) ends it, and then it says so in its last message.
"""

from __future__ import annotations

import os
import queue
import signal
from multiprocessing.connection import Connection
from typing import Callable, Optional

from pagedllm.config import EngineConfig
from pagedllm.engine.core_messages import (
    AbortRequests,
    AddRequests,
    EngineCommand,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineDeadError,
    GetEngineState,
    RequestError,
    Shutdown,
)
from pagedllm.engine.engine_core import EngineCore, StepFailedError
from pagedllm.executor.abstract import ExecutorDeadError
from pagedllm.logger import init_logger

logger = init_logger(__name__)

# Steps failing this many times in a row outside `EngineCore.step`'s own isolation (an error in the
# loop's bookkeeping, not in the model) mean the engine itself is broken.
_MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineCoreLoop:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._consecutive_failures = 0

    def run_busy_loop(self, get_commands: Callable[[bool], list[EngineCommand]],
                      put: Callable[[EngineCoreOutputs], None]) -> None:
        """Serve until a `Shutdown` command; an exception escaping here means the engine is dead.

        `get_commands(block)` returns the pending commands, waiting for at least one when
        `block` is true (the engine has nothing else to do).
        """
        while True:
            result, stop = self.run_iteration(get_commands(not self.core.has_unfinished_requests()))
            put(result)
            if stop:
                return

    def run_iteration(self, commands: list[EngineCommand]) -> tuple[EngineCoreOutputs, bool]:
        """Apply the commands, run one step if there is work; True as well after a `Shutdown`.

        One iteration of the loop, callable on its own by a frontend that drives the loop
        remotely (a Ray actor's method).
        """
        result = EngineCoreOutputs()
        state_asked = False
        for command in commands:
            if isinstance(command, Shutdown):
                ids = self.core.unfinished_request_ids()
                self._abort(AbortRequests(ids, error="the server is shutting down"), result)
                result.stats = self.core.stats()
                return result, True
            if isinstance(command, AddRequests):
                self._add(command, result)
            elif isinstance(command, GetEngineState):
                state_asked = True
            else:
                self._abort(command, result)
        if self.core.has_unfinished_requests():
            result.outputs = self._step(result)
        result.stats = self.core.stats()
        if state_asked:
            self._snapshot(result)
        return result, False

    def _snapshot(self, result: EngineCoreOutputs) -> None:
        try:
            result.engine_state = self.core.get_engine_state()
        except Exception as e:  # a view of the engine must never stop it
            logger.exception("taking the engine-state snapshot failed")
            result.engine_state_error = f"could not take the engine-state snapshot: {e!r}"

    def _add(self, command: AddRequests, result: EngineCoreOutputs) -> None:
        """All of one user request's sequences, or none of them (`EngineCore.add_requests`)."""
        try:
            self.core.add_requests(command.requests)
        except Exception as e:  # the request must not take the loop down with it
            logger.exception("adding request %s failed", command.requests[0].request_id)
            status = 400 if isinstance(e, ValueError) else 500
            message = str(e) if status == 400 else f"the engine could not add the request: {e}"
            result.errors.extend(RequestError(r.request_id, message, status) for r in command.requests)

    def _abort(self, command: AbortRequests, result: EngineCoreOutputs) -> None:
        self.core.abort_requests(command.request_ids, command.status)
        if command.error is not None:
            result.errors.extend(RequestError(rid, command.error, 503) for rid in command.request_ids)

    def _step(self, result: EngineCoreOutputs) -> list[EngineCoreOutput]:
        try:
            outputs = self.core.step()
        except ExecutorDeadError as e:  # a worker is gone: no later step can succeed
            raise EngineDeadError(str(e)) from e
        except StepFailedError as e:
            if e.engine_broken:
                raise EngineDeadError(f"the engine is broken: its steps fail whatever runs ({e})") from e
            if e.culprit is None:
                logger.warning("engine step failed (%s); running its %d request(s) one at a time to find the cause",
                               e, len(self.core.suspects))
                return []
            logger.error("request %s breaks engine steps (%s); failing it alone", e.culprit, e.__cause__ or e)
            self.core.abort_requests([e.culprit])
            result.errors.append(RequestError(e.culprit, f"the engine failed while running this request: {e}", 500))
            return []
        except Exception as e:
            self._consecutive_failures += 1
            if self._consecutive_failures >= _MAX_CONSECUTIVE_STEP_FAILURES:
                raise EngineDeadError(f"the engine step failed {self._consecutive_failures} times in a row: {e}") from e
            # Blame the sequences that were running: the step was theirs. Aborting them frees
            # their blocks, which puts the scheduler and the KV cache back in a clean state.
            victims = self.core.running_request_ids() or self.core.unfinished_request_ids()
            logger.exception("engine step failed; failing %d sequence(s) and carrying on", len(victims))
            self.core.abort_requests(victims)
            result.errors.extend(RequestError(rid, f"the engine failed while running this request: {e!r}", 500)
                                 for rid in victims)
            try:
                self.core.check_idle_invariant()
            except RuntimeError as invariant:
                raise EngineDeadError(f"{invariant} after a failed step") from e
            return []
        self._consecutive_failures = 0
        return outputs


# ----- the three homes of the loop ------------------------------------------------------
def run_in_thread(loop: EngineCoreLoop, inbox: "queue.Queue[EngineCommand]",
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
        loop.run_busy_loop(get_commands, put)
    except BaseException as e:  # noqa: BLE001 - whatever it was, the engine is gone
        logger.exception("the engine loop died")
        put(EngineCoreOutputs(dead=f"{type(e).__name__}: {e}"))


def run_engine_core_process(config: EngineConfig, conn: Connection,
                            cuda_visible_devices: Optional[str] = None) -> None:
    """Process target: build the engine core, report ready (or the error), then serve over `conn`.

    `cuda_visible_devices` gives a data-parallel replica its own GPUs (set before CUDA starts).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when to stop
    if cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    try:
        core = EngineCore(config)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{e}", isinstance(e, ValueError)))
        return
    conn.send(("ready", None))

    def get_commands(block: bool) -> list[EngineCommand]:
        commands: list[EngineCommand] = []
        try:
            if block:
                commands.append(conn.recv())
            while conn.poll():
                commands.append(conn.recv())
        except (EOFError, OSError):  # the frontend is gone
            commands.append(Shutdown())
        return commands

    def put(out: EngineCoreOutputs) -> None:
        try:
            conn.send(out)
        except (BrokenPipeError, OSError):
            pass

    try:
        EngineCoreLoop(core).run_busy_loop(get_commands, put)
    except BaseException as e:  # noqa: BLE001
        logger.exception("the engine loop died")
        put(EngineCoreOutputs(dead=f"{type(e).__name__}: {e}"))
    finally:
        core.shutdown()


class EngineCoreActor:
    """The engine core as a Ray actor (wrapped with `ray.remote` at run time: Ray stays optional).

    The client drives it one loop iteration per call, so the actor needs no thread or channel of
    its own, and Ray carries the commands and the outputs.
    """

    def __init__(self, config: EngineConfig, num_threads: Optional[int]) -> None:
        import torch

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.loop = EngineCoreLoop(EngineCore(config))

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def run_iteration(self, commands: list[EngineCommand]) -> tuple[EngineCoreOutputs, bool, bool]:
        """(outputs, stopped, has work left)."""
        result, stop = self.loop.run_iteration(commands)
        if stop:
            self.loop.core.shutdown()
        return result, stop, self.loop.core.has_unfinished_requests()
