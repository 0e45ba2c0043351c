"""`MultiprocExecutor`: tp x pp workers (tensor-parallel ranks of each pipeline stage), one process
each, on this machine.

The workers are started with `torch.multiprocessing` (spawn) and join one `torch.distributed`
group (gloo on CPU, NCCL on CUDA) at a free port of 127.0.0.1, so several engines can share a
host. Every call on the workers (`collective_rpc`: the start-up phases, then one `execute_model`
per step) is pickled once and sent down one pipe per worker; every rank runs it and answers, the
output rank (rank 0 of the last stage) with the sampled tokens, the others with an empty
acknowledgement (so that a failure on any rank is seen). With pipeline stages, steps are sent
ahead (`submit_step`) and their replies read later (`wait_step`): each pipe keeps them in order.

A worker that dies is noticed at once: while waiting for replies the executor also waits on every
worker's process sentinel. Then the remaining workers are killed (they may be stuck in a
collective with the dead one) and this and every later step raise `ExecutorDeadError`. An error
raised inside a worker is fatal the same way, since the ranks may no longer be in step.
"""

from __future__ import annotations

import os
import pickle
import signal
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import get_distributed_init_method, get_open_port
from pagedllm.executor.abstract import Executor, ExecutorDeadError
from pagedllm.logger import init_logger
from pagedllm.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = init_logger(__name__)


def worker_threads(config: EngineConfig, world_size: int) -> Optional[int]:
    """On CPU the workers share the cores this process would have used: no oversubscription."""
    if config.device.type != "cpu":
        return None
    return max(1, torch.get_num_threads() // world_size)


def run_worker_process(config: EngineConfig, rank: int, world_size: int, distributed_init_method: str,
                       num_threads: Optional[int], conn: Connection) -> None:
    """Process target: build the worker, say ready, then run the calls it is sent until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine decides when the workers stop
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pagedllm.worker.worker import Worker

    try:
        worker = Worker(config, rank, world_size, distributed_init_method, num_threads=num_threads)
    except BaseException as e:  # noqa: BLE001 - reported to the engine, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}", isinstance(e, ValueError)))
        return
    conn.send(("ready", None))
    try:
        while True:
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the engine is gone
                return
            if method == "shutdown":
                return
            try:
                conn.send(("ok", getattr(worker, method)(*args)))
            except BaseException as e:  # noqa: BLE001
                conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
                return
    finally:
        worker.shutdown()


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.world_size = config.parallel_config.world_size
        self._dead: Optional[str] = None
        init_method = get_distributed_init_method("127.0.0.1", get_open_port())
        threads = worker_threads(config, self.world_size)
        ctx = mp.get_context("spawn")
        self.processes: list[Any] = []
        self.conns: list[Connection] = []
        for rank in range(self.world_size):
            parent_conn, child_conn = ctx.Pipe()
            process = ctx.Process(target=run_worker_process, name=f"pagedllm-tp-worker-{rank}", daemon=True,
                                  args=(config, rank, self.world_size, init_method, threads, child_conn))
            process.start()
            child_conn.close()
            self.processes.append(process)
            self.conns.append(parent_conn)
        # Workers left behind by an executor that is dropped without shutdown() are killed.
        self._finalizer = weakref.finalize(self, _kill, list(self.processes))
        try:
            replies = self._collect("start")
        except BaseException:
            self.shutdown()
            raise
        for rank, reply in enumerate(replies):
            if reply[0] == "failed":
                self.shutdown()
                raise (ValueError if reply[2] else RuntimeError)(f"tensor-parallel worker {rank} failed to start: {reply[1]}")
        pc = config.parallel_config
        kind = ("tensor-parallel workers" if pc.pipeline_parallel_size == 1 else
                f"workers ({pc.pipeline_parallel_size} pipeline stages x {pc.tensor_parallel_size} tensor-parallel)")
        logger.info("Started %d %s (%s) at %s", self.world_size, kind,
                    "nccl" if config.device.type == "cuda" else "gloo", init_method)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        if self._pending:
            raise RuntimeError(f"collective_rpc({method!r}) while {len(self._pending)} steps are in flight")
        self._send(method, args)
        return [reply[1] for reply in self._collect("step" if method == "execute_model" else method)]

    def submit_step(self, scheduler_output: SchedulerOutput) -> None:
        """Send the step to every worker and return: a worker's pipe queues it behind the steps it is
        still running, so each stage starts it as soon as it is done with the previous one."""
        self._send("execute_model", (scheduler_output,))
        self._pending.append(None)

    def wait_step(self) -> ModelRunnerOutput:
        """Every worker answers its steps in order: the next reply of each is the oldest step's."""
        self._pending.popleft()
        return self._collect("step")[self.config.parallel_config.output_rank][1]

    def _send(self, method: str, args: tuple) -> None:
        self.check_health()
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(payload)
            except (BrokenPipeError, OSError):
                self._die(f"tensor-parallel worker {rank} is gone (exit code {self.processes[rank].exitcode})")

    def _collect(self, what: str) -> list[tuple]:
        """One reply from every worker, or `ExecutorDeadError` as soon as one of them dies or fails."""
        replies: dict[int, tuple] = {}
        conns = {conn: rank for rank, conn in enumerate(self.conns)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes)}
        while len(replies) < self.world_size:
            for ready in wait(list(conns) + list(sentinels)):
                if ready in conns:
                    rank = conns.pop(ready)
                    try:
                        replies[rank] = ready.recv()
                    except (EOFError, OSError):
                        self._die(self._death_message(rank, what))
                    if replies[rank][0] == "error":  # the other ranks may be stuck waiting for it
                        self._die(f"tensor-parallel worker {rank} failed: {replies[rank][1]}")
                elif ready in sentinels:
                    rank = sentinels.pop(ready)
                    if rank not in replies and not self._has_reply(rank):
                        self._die(self._death_message(rank, what))
        return [replies[rank] for rank in range(self.world_size)]

    def _has_reply(self, rank: int) -> bool:
        """A worker that exited after sending its last word (a start-up failure) is not lost."""
        try:
            return self.conns[rank].poll()
        except (EOFError, OSError):
            return False

    def _death_message(self, rank: int, what: str) -> str:
        process = self.processes[rank]
        process.join(1)
        return f"tensor-parallel worker {rank} (pid {process.pid}) died during {what} with exit code {process.exitcode}"

    def _die(self, reason: str) -> None:
        self._dead = reason
        logger.error("%s; stopping the other workers", reason)
        _kill(self.processes)
        raise ExecutorDeadError(reason)

    def check_health(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(f"the executor is dead: {self._dead}")
        for rank, process in enumerate(self.processes):
            if not process.is_alive():
                self._die(self._death_message(rank, "idle time"))

    def shutdown(self, timeout: float = 10.0) -> None:
        payload = pickle.dumps(("shutdown", None))
        for conn, process in zip(self.conns, self.processes):
            if process.is_alive():
                try:
                    conn.send_bytes(payload)
                except (BrokenPipeError, OSError):
                    pass
        for process in self.processes:
            process.join(timeout)
        _kill(self.processes)
        for conn in self.conns:
            conn.close()
        self.conns, self.processes = [], []
        self._dead = self._dead or "the executor was shut down"


def _kill(processes: list[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(5)
