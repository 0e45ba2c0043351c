"""`Worker`: one rank of the model — its device, its place in the tensor-parallel group and the
pipeline, and its `ModelRunner` (its share of the model and of the KV cache).

Every executor drives its workers through the same three phases as vLLM's: built (device, process
group, model loaded), `determine_available_memory` (the bytes this rank can give the KV cache:
the configured budget, or on GPU what a profiling pass leaves), `initialize_kv_cache` (allocate
the count the engine core settled on, capture CUDA graphs); then `execute_model` once per step,
on every rank with the same `SchedulerOutput` (each pipeline stage runs its layers of it). In this process (`UniProcExecutor`), in worker
processes (`MultiprocExecutor`) or in Ray actors (`RayDistributedExecutor`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import (
    PipelineParallelGroup,
    TensorParallelGroup,
    destroy_distributed_environment,
    init_distributed_environment,
)
from pagedllm.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.memory_profiler import MemoryProfile, kv_cache_budget, profile_memory
from pagedllm.worker.model_runner import ModelRunner


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1,
                 distributed_init_method: Optional[str] = None, local_rank: Optional[int] = None,
                 num_threads: Optional[int] = None) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        device = config.device
        if device.type == "cuda" and world_size > 1:
            device = torch.device("cuda", rank if local_rank is None else local_rank)
            torch.cuda.set_device(device)
            config = dataclasses.replace(config, device=device)
        self.config = config
        self.rank = rank
        pc = config.parallel_config
        if world_size > 1:
            self.tp_group, self.pp_group = init_distributed_environment(
                rank, world_size, distributed_init_method, device,
                tensor_parallel_size=world_size // pc.pipeline_parallel_size, layer_partition=pc.pp_layer_partition)
        else:
            self.tp_group, self.pp_group = TensorParallelGroup(), PipelineParallelGroup()
        # The one rank whose output the engine reads (rank 0 of the last stage); the others' are dropped.
        self.is_output_rank = rank == (pc.output_rank if world_size > 1 else 0)
        self.model_runner: Optional[ModelRunner] = ModelRunner(config, self.tp_group, self.pp_group)
        self.memory_profile: Optional[MemoryProfile] = None  # taken on GPU when the budget is not given

    def determine_available_memory(self) -> int:
        """Bytes this rank can give the KV cache: `kv_cache_memory_bytes` (on CPU set from
        `PAGEDLLM_CPU_KVCACHE_SPACE` when not given), else, on GPU, what `gpu_memory_utilization`
        leaves after a profiling pass (`worker/memory_profiler.py`)."""
        cc = self.config.cache_config
        if cc.kv_cache_memory_bytes is not None:
            return cc.kv_cache_memory_bytes
        self.memory_profile = profile_memory(self.model_runner)
        return kv_cache_budget(self.memory_profile, cc.gpu_memory_utilization)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """Every rank runs the step; only the output rank answers (the other ranks of the last stage
        sampled the same tokens; earlier stages sampled nothing)."""
        output = self.model_runner.execute_model(scheduler_output)
        return output if self.is_output_rank else None

    def weight_bytes(self) -> int:
        """Bytes of the weights this rank holds (its share of its stage's layers): each linear layer's
        as its method keeps them (a packed or quantized form may not be a parameter), the rest as
        parameters and buffers."""
        total = 0
        for module in self.model_runner.model.modules():
            method = getattr(module, "linear_method", None)
            tensors = [t for name, t in module.named_parameters(recurse=False) if method is None or name != "weight"]
            tensors += list(module.buffers(recurse=False))
            total += sum(t.numel() * t.element_size() for t in tensors)
            if method is not None:
                total += method.weight_bytes(module)
        return total

    def shutdown(self) -> None:
        """Drop the model, the KV cache and the CUDA graphs so their memory returns at once."""
        runner, self.model_runner = self.model_runner, None
        if runner is not None:
            runner.cuda_graphs = None  # the graphs hold the model, the cache and their memory pool
            runner.kv_caches = []
            runner.model = None
        destroy_distributed_environment()
