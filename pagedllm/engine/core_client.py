"""Engine-core clients: how a frontend reaches an engine core.

`InprocClient` is the offline `LLMEngine`'s: the core in this process, called directly, one step
per `get_output()`. The server's `AsyncLLM` uses one of the asynchronous clients per data-parallel
replica, each of which runs the core's busy loop somewhere else: `ThreadClient` in a background
thread of this process, `MPClient` in a process of its own (vLLM v1's layout), `RayClient` in a
Ray actor anywhere in a cluster. They take commands through `send` and hand each loop iteration's
`EngineCoreOutputs` to the callback given to `start`, from a thread of their own.

With data parallelism the frontend holds M asynchronous clients and a `LoadBalancer` that sends
each new request to the replica with the fewest requests in flight.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import threading
from abc import ABC, abstractmethod
from typing import Callable, Optional

from pagedllm.config import EngineConfig
from pagedllm.engine.core_loop import EngineCoreActor, EngineCoreLoop, run_engine_core_process, run_in_thread
from pagedllm.engine.core_messages import EngineCommand, EngineCoreOutputs, Shutdown
from pagedllm.engine.engine_core import EngineCore
from pagedllm.engine.engine_state import EngineState
from pagedllm.logger import init_logger
from pagedllm.request import EngineCoreRequest, RequestStatus

logger = init_logger(__name__)

PostOutputs = Callable[[EngineCoreOutputs], None]


# ----- offline: the core in this process, stepped by the caller ------------------------------
class InprocClient:
    """The engine core in this process; each `get_output()` runs one step."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self.core.add_requests(requests)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self.core.abort_requests(request_ids, status)

    def get_output(self) -> EngineCoreOutputs:
        outputs = self.core.step() if self.core.has_unfinished_requests() else []
        return EngineCoreOutputs(outputs=outputs, stats=self.core.stats())

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def get_engine_state(self) -> EngineState:
        return self.core.get_engine_state()

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    def shutdown(self) -> None:
        self.core.shutdown()


# ----- the server: the core's busy loop elsewhere --------------------------------------------
class AsyncEngineCoreClient(ABC):
    @abstractmethod
    def start(self, post: PostOutputs) -> None:
        """Start delivering the loop's outputs to `post` (called from another thread)."""

    @abstractmethod
    def send(self, command: EngineCommand) -> None:
        """Queue a command for the loop; never blocks."""

    @abstractmethod
    def shutdown(self, timeout: float) -> None:
        """Wait (blocking) for the loop to end after a `Shutdown`; force it if it does not."""


class ThreadClient(AsyncEngineCoreClient):
    """The loop in a background thread of this process (it shares the GIL with the server)."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self._inbox: queue.Queue[EngineCommand] = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def start(self, post: PostOutputs) -> None:
        self._thread = threading.Thread(target=run_in_thread, args=(EngineCoreLoop(self.core), self._inbox, post),
                                        name="pagedllm-engine-core", daemon=True)
        self._thread.start()

    def send(self, command: EngineCommand) -> None:
        self._inbox.put(command)

    def shutdown(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        self.core.shutdown()


class MPClient(AsyncEngineCoreClient):
    """The loop in a spawned process, over a pipe; a sender and a receiver thread on this side.

    The process is not a daemon, so that it may start tensor-parallel worker processes of its own;
    it ends when told to, or when its pipe closes because this process is gone.
    """

    def __init__(self, config: EngineConfig, index: int = 0, cuda_visible_devices: Optional[str] = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=run_engine_core_process, name=f"pagedllm-engine-core-{index}",
                                   args=(config, child_conn, cuda_visible_devices), daemon=False)
        self.process.start()
        child_conn.close()
        try:
            message = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the engine process died while starting (exit code {self.process.exitcode})")
        if message[0] == "failed":
            self.process.join(10)
            raise (ValueError if message[2] else RuntimeError)(message[1])
        self._outbox: queue.Queue[Optional[EngineCommand]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._shutting_down = False

    def start(self, post: PostOutputs) -> None:
        for target, name in ((self._send_loop, "sender"), (self._receive_loop, "receiver")):
            thread = threading.Thread(target=target, args=(post,), name=f"pagedllm-engine-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def send(self, command: EngineCommand) -> None:
        self._outbox.put(command)

    def shutdown(self, timeout: float) -> None:
        self._shutting_down = True
        if not self._threads:  # never started: closing the pipe is the process's shutdown
            self._conn.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def _send_loop(self, post: PostOutputs) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self._conn.send(command)
            except (BrokenPipeError, OSError):
                return

    def _receive_loop(self, post: PostOutputs) -> None:
        while True:
            try:
                outputs = self._conn.recv()
            except (EOFError, OSError):
                if not self._shutting_down:
                    self.process.join(1)
                    post(EngineCoreOutputs(dead=f"the engine process exited (code {self.process.exitcode})"))
                return
            post(outputs)
            if outputs.dead is not None:
                return


class RayClient(AsyncEngineCoreClient):
    """An engine core in a Ray actor, placed by Ray (replicas spread over the cluster's nodes)."""

    def __init__(self, config: EngineConfig, index: int = 0, num_threads: Optional[int] = None) -> None:
        from pagedllm.executor.ray_utils import engine_core_actor_options, initialize_ray_cluster

        ray = initialize_ray_cluster()
        self._ray = ray
        actor_cls = ray.remote(EngineCoreActor)
        self.actor = actor_cls.options(name=None, **engine_core_actor_options(config)).remote(config, num_threads)
        try:
            self.node_ip = ray.get(self.actor.node_ip.remote())
        except ray.exceptions.RayActorError as e:
            cause = getattr(e, "cause", None) or e
            raise (ValueError if isinstance(cause, ValueError) else RuntimeError)(
                f"engine replica {index} failed to start in Ray: {cause}") from e
        logger.info("Engine replica %d runs as a Ray actor on node %s", index, self.node_ip)
        self._outbox: queue.Queue[EngineCommand] = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def start(self, post: PostOutputs) -> None:
        self._thread = threading.Thread(target=self._drive, args=(post,), name="pagedllm-ray-engine", daemon=True)
        self._thread.start()

    def send(self, command: EngineCommand) -> None:
        self._outbox.put(command)

    def shutdown(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self._ray.kill(self.actor)
        except Exception:  # noqa: BLE001 - the actor or Ray may already be gone
            pass

    def _drive(self, post: PostOutputs) -> None:
        has_work = False
        while True:
            commands = [] if has_work else [self._outbox.get()]
            while True:
                try:
                    commands.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            try:
                outputs, stop, has_work = self._ray.get(self.actor.run_iteration.remote(commands))
            except Exception as e:  # noqa: BLE001 - the actor died, or its loop did
                post(EngineCoreOutputs(dead=f"the Ray engine actor failed: {type(e).__name__}: {e}"))
                return
            post(outputs)
            if stop or outputs.dead is not None:
                return


class LoadBalancer:
    """Data parallelism's request placement: the replica with the fewest requests in flight, ties
    going to the one that has been given fewest so far (so a trickle of requests alternates).
    Called from the event loop's thread only."""

    def __init__(self, num_engines: int) -> None:
        self.in_flight = [0] * num_engines
        self.assigned = [0] * num_engines

    def acquire(self) -> int:
        index = min(range(len(self.in_flight)), key=lambda i: (self.in_flight[i], self.assigned[i]))
        self.in_flight[index] += 1
        self.assigned[index] += 1
        return index

    def release(self, index: int) -> None:
        self.in_flight[index] -= 1


def make_async_clients(config: EngineConfig, engine_process: bool) -> list[AsyncEngineCoreClient]:
    """The replicas `data_parallel_size` and `distributed_executor_backend` ask for."""
    pc = config.parallel_config
    dp, backend = pc.data_parallel_size, pc.distributed_executor_backend
    clients: list[AsyncEngineCoreClient] = []
    gpus = _visible_gpus(config) if backend != "ray" and dp > 1 else None
    try:
        for index in range(dp):
            if backend == "ray":
                clients.append(RayClient(_replica_config(config), index))
            elif engine_process:
                devices = None if gpus is None else replica_devices(index, pc.world_size, gpus)
                clients.append(MPClient(_replica_config(config), index, devices))
            elif dp > 1:
                raise ValueError("data_parallel_size > 1 needs the engine core in its own process "
                                 "(--engine-core process) or Ray")
            else:
                clients.append(ThreadClient(config))
    except BaseException:
        for client in clients:
            client.send(Shutdown())
            client.shutdown(10)
        raise
    return clients


def replica_devices(index: int, world_size: int, visible: list[str]) -> str:
    """CUDA_VISIBLE_DEVICES of replica `index`: its own run of `world_size` (tp x pp) GPUs."""
    start = index * world_size
    if start + world_size > len(visible):
        raise ValueError(
            f"data-parallel replica {index} with {world_size} workers (tensor x pipeline parallel) needs GPUs "
            f"{start}..{start + world_size - 1}, but only {len(visible)} are visible"
        )
    return ",".join(visible[start : start + world_size])


def _visible_gpus(config: EngineConfig) -> Optional[list[str]]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them, or None on CPU."""
    import torch

    if config.device.type != "cuda":
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _replica_config(config: EngineConfig) -> EngineConfig:
    """One replica's engine: the data-parallel size is the frontend's business, not the engine's."""
    pc = dataclasses.replace(config.parallel_config, data_parallel_size=1)
    if pc.distributed_executor_backend == "ray" and pc.world_size == 1:
        pc = dataclasses.replace(pc, distributed_executor_backend="uni")  # the replica actor runs the model itself
    return dataclasses.replace(config, parallel_config=pc)
