"""`RayDistributedExecutor`: the workers (tensor-parallel ranks of each pipeline stage) as Ray actors,
on any node of a cluster.

The same protocol as `MultiprocExecutor`: every rank runs each call (`collective_rpc`; a step's
`SchedulerOutput` is put in Ray's object store once), and every rank's result comes back. The workers live in one placement group
packed on one node; the process group meets at rank 0's node address. A worker that dies makes
Ray fail its call (`RayActorError`), which is raised as `ExecutorDeadError` as soon as it is seen.
"""

from __future__ import annotations

from typing import Any, Optional

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import get_distributed_init_method
from pagedllm.executor.abstract import Executor, ExecutorDeadError
from pagedllm.executor.ray_utils import RayWorkerWrapper, initialize_ray_cluster
from pagedllm.logger import init_logger
from pagedllm.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = init_logger(__name__)

PLACEMENT_TIMEOUT_S = 120


class RayDistributedExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self._ray = initialize_ray_cluster()
        self._remove_placement_group = remove_placement_group
        self._dead: Optional[str] = None
        self.world_size = config.parallel_config.world_size
        gpu = config.device.type == "cuda"
        bundle = {"GPU": 1} if gpu else {"CPU": 1}
        self.placement_group = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="STRICT_PACK")
        try:
            ray.get(self.placement_group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as e:
            remove_placement_group(self.placement_group)
            raise ValueError(f"the Ray cluster cannot place {self.world_size} tensor-parallel workers of "
                             f"{bundle} on one node (waited {PLACEMENT_TIMEOUT_S} s)") from e
        actor_cls = ray.remote(RayWorkerWrapper)
        self.workers = [
            actor_cls.options(
                num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote()
            for i in range(self.world_size)
        ]
        ip, port = ray.get(self.workers[0].get_node_ip_and_free_port.remote())
        init_method = get_distributed_init_method(ip, port)
        # Ray shows each GPU actor only its own GPU, as cuda:0; on CPU each worker gets the one
        # core its bundle reserved.
        local_rank, threads = (0, None) if gpu else (None, 1)
        try:
            self._gather([w.init_worker.remote(config, rank, self.world_size, init_method, local_rank, threads)
                          for rank, w in enumerate(self.workers)], "start")
        except BaseException:
            self.shutdown()
            raise
        logger.info("Started %d tensor-parallel Ray workers at %s", self.world_size, init_method)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        what = "step" if method == "execute_model" else method
        return self._gather(self._call(method, args), what)

    def submit_step(self, scheduler_output: SchedulerOutput) -> None:
        """Queue the step on every actor and return (an actor runs its calls in order)."""
        self._pending.append(self._call("execute_model", (scheduler_output,)))

    def wait_step(self) -> ModelRunnerOutput:
        return self._gather(self._pending.popleft(), "step")[self.config.parallel_config.output_rank]

    def _call(self, method: str, args: tuple) -> list[Any]:
        self.check_health()
        refs = [self._ray.put(arg) for arg in args]  # once, not once per worker
        return [w.execute_method.remote(method, *refs) for w in self.workers]

    def _gather(self, refs: list[Any], what: str) -> list[Any]:
        """Every result, failing at the first worker that is seen to fail (not after the others)."""
        ray = self._ray
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    results[index[ref]] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._die(f"tensor-parallel Ray worker {index[ref]} died during {what}: {e}")
                except ray.exceptions.RayTaskError as e:
                    cause = e.as_instanceof_cause()
                    if what == "start" and isinstance(cause, ValueError):
                        raise ValueError(str(cause)) from e
                    self._die(f"tensor-parallel Ray worker {index[ref]} failed during {what}: {cause}")
        return [results[i] for i in range(len(refs))]

    def _die(self, reason: str) -> None:
        self._dead = reason
        logger.error("%s; stopping the other workers", reason)
        for worker in self.workers:
            self._ray.kill(worker)
        raise ExecutorDeadError(reason)

    def check_health(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(f"the executor is dead: {self._dead}")

    def shutdown(self) -> None:
        for worker in getattr(self, "workers", []):
            try:
                self._ray.kill(worker)
            except Exception:  # noqa: BLE001
                pass
        self.workers = []
        if getattr(self, "placement_group", None) is not None:
            try:
                self._remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001
                pass
            self.placement_group = None
        self._dead = self._dead or "the executor was shut down"
