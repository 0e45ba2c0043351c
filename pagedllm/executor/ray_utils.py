"""Ray, when `distributed_executor_backend="ray"`: joining the cluster, placing actors.

Ray is an optional dependency (`pip install "pagedllm[ray]"`); nothing imports it until the
Ray backend is asked for, and then its absence is a clear error. `ray.init()` joins the cluster
this machine belongs to (`ray start --head` here, or `ray start --address=HEAD:6379` to join),
or starts a local one-machine cluster when there is none.

Placement: each data-parallel replica (an engine core) is an actor, spread over the nodes; a
replica that runs the model itself (tp=1) reserves one GPU (or one CPU); a tensor-parallel
replica reserves nothing itself and places its N workers in a placement group of N bundles of one
GPU (or CPU) each, packed on one node, since they exchange activations at every layer.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from pagedllm.config import EngineConfig

# Environment variables that Ray's worker processes must see as this process sees them.
_FORWARDED_ENV_PREFIXES = ("PAGEDLLM_", "TRITON_INTERPRET", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ValueError(
            "distributed_executor_backend='ray' needs Ray, which is not installed: "
            "pip install 'pagedllm[ray]' (or pip install ray)"
        ) from e
    return ray


def initialize_ray_cluster() -> Any:
    """Connect to the running cluster (`ray start`, or $RAY_ADDRESS), else start a local one."""
    ray = import_ray()
    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES)}
        in_main_thread = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if in_main_thread else None
        ray.init(runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=True)
        if in_main_thread:
            # ray.init turns SIGTERM into sys.exit(15); the server has its own graceful
            # shutdown (and calls shutdown_ray at its end), so the handler goes back as it was.
            signal.signal(signal.SIGTERM, sigterm)
    return ray


def shutdown_ray() -> None:
    """Leave the cluster (a local one started by `initialize_ray_cluster` stops with it)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def engine_core_actor_options(config: EngineConfig) -> dict[str, Any]:
    """Resources and placement of one replica's engine-core actor."""
    workers = config.parallel_config.world_size
    ray = import_ray()
    resource = "GPU" if config.device.type == "cuda" else "CPU"
    _check_cluster_has(ray, resource, workers)
    options: dict[str, Any] = {"scheduling_strategy": "SPREAD", "num_cpus": 0, "num_gpus": 0}
    if workers == 1:  # the actor runs the model itself
        options["num_gpus" if resource == "GPU" else "num_cpus"] = 1
    return options


def _check_cluster_has(ray: Any, resource: str, amount: int) -> None:
    total = ray.cluster_resources().get(resource, 0)
    if total < amount:
        raise ValueError(f"the Ray cluster has {total:g} {resource}(s), fewer than the {amount} a replica needs")


class RayWorkerWrapper:
    """A tensor-parallel worker as a Ray actor (wrapped with `ray.remote` at run time)."""

    def __init__(self) -> None:
        self.worker = None

    def get_node_ip_and_free_port(self) -> tuple[str, int]:
        from pagedllm.distributed.parallel_state import get_ip, get_open_port

        return get_ip(), get_open_port("")

    def init_worker(self, config: Any, rank: int, world_size: int, distributed_init_method: str,
                    local_rank: int | None, num_threads: int | None) -> None:
        from pagedllm.worker.worker import Worker

        self.worker = Worker(config, rank, world_size, distributed_init_method, local_rank=local_rank,
                             num_threads=num_threads)

    def execute_method(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
