"""How much GPU memory the KV cache may take, measured as vLLM measures it.

After the weights are loaded and before the KV cache exists, one forward pass runs at the
largest batch the scheduler can form (`max_num_batched_tokens` tokens over up to
`max_num_seqs` sequences), followed by the sampler's worst case (top-k, top-p and logprobs on
every row), against a throw-away KV cache just large enough for it. The peak PyTorch
allocation during that pass, less what was allocated before it, is the activation memory
every later step fits inside. With CUDA graphs, an eager decode step at the largest capture
size is measured the same way: the graphs' shared pool holds about that much.

    kv_cache_bytes = total * gpu_memory_utilization
                     - weights - peak activations - non-torch memory - CUDA-graph pool

`non-torch memory` is what the process and others hold outside PyTorch's allocator (the CUDA
context, cuBLAS workspaces, other processes): `total - free - torch reserved`. The arithmetic
is `kv_cache_budget`, a pure function; `profile_memory` takes the measurements, running its steps
through whatever `ProfiledRunner` it is given (the model runner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pagedllm.config import EngineConfig
from pagedllm.logger import init_logger
from pagedllm.sampling_params import SamplingParams
from pagedllm.scheduler_output import ScheduledRequest
from pagedllm.utils import cdiv
from pagedllm.worker.kv_cache import KVCaches

logger = init_logger(__name__)

GiB = float(1 << 30)


@dataclass(frozen=True)
class MemoryProfile:
    total_bytes: int  # the device's memory
    weights_bytes: int  # allocated once the model is loaded
    peak_activation_bytes: int  # the largest step's peak above weights (and its own KV cache)
    non_torch_bytes: int  # held outside PyTorch's allocator
    cuda_graph_bytes: int = 0  # reserved for the decode graphs' shared pool


def kv_cache_budget(profile: MemoryProfile, gpu_memory_utilization: float) -> int:
    """Bytes left for the KV cache within `gpu_memory_utilization` of the device (may be negative)."""
    allowed = int(profile.total_bytes * gpu_memory_utilization)
    return (allowed - profile.weights_bytes - profile.peak_activation_bytes - profile.non_torch_bytes
            - profile.cuda_graph_bytes)


def dummy_batch_lengths(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """Prompt lengths for the profiling pass: the token budget spread over up to max_num_seqs
    prompts, none longer than max_model_len, as the scheduler's fullest prefill step could be."""
    num_seqs = max(1, min(max_num_seqs, max_num_batched_tokens))
    tokens = min(max_num_batched_tokens, num_seqs * max_model_len)
    base, extra = divmod(tokens, num_seqs)
    return [base + (i < extra) for i in range(num_seqs) if base + (i < extra) > 0]


def dummy_requests(lengths: list[int], block_size: int, params: SamplingParams) -> list[ScheduledRequest]:
    """Prompts of token 0 laid out in consecutive blocks of a throw-away cache."""
    requests, next_block = [], 0
    for i, n in enumerate(lengths):
        count = cdiv(n, block_size)
        requests.append(ScheduledRequest(
            request_id=f"profile-{i}", token_ids=[0] * n, num_computed_tokens=0,
            block_ids=list(range(next_block, next_block + count)), sampling_params=params,
            prompt_token_ids=[0] * n, output_token_ids=[], sample=True,
        ))
        next_block += count
    return requests


class ProfiledRunner(Protocol):
    """What the profile needs of the model runner: its config and device, the decode-graph sizes it
    will capture, and a way to run one eager step into a throw-away cache."""

    config: EngineConfig
    device: torch.device
    block_size: int
    graph_sizes: list[int]

    def dummy_step(self, requests: list[ScheduledRequest], kv_caches: KVCaches, sample: bool) -> None: ...

    def allocate_dummy_kv_caches(self, num_blocks: int) -> KVCaches: ...


def _peak_step_bytes(runner: ProfiledRunner, requests: list[ScheduledRequest], sample: bool) -> int:
    """Peak bytes allocated by one step over `requests`, beyond its own KV cache (a throw-away one
    just large enough for them)."""
    kv_caches = runner.allocate_dummy_kv_caches(max(max(r.block_ids) for r in requests) + 1)
    torch.cuda.synchronize(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    before = torch.cuda.memory_allocated(runner.device)
    runner.dummy_step(requests, kv_caches, sample)
    torch.cuda.synchronize(runner.device)
    peak = torch.cuda.max_memory_allocated(runner.device) - before
    del kv_caches
    return peak


def profile_memory(runner: ProfiledRunner) -> MemoryProfile:
    """Measure weights, peak activations and non-torch memory (see the module docstring)."""
    device, sc = runner.device, runner.config.scheduler_config
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    # The sampler's costliest path on every row: filtering (sorts the vocabulary) and logprobs.
    worst = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=20)
    lengths = dummy_batch_lengths(sc.max_num_batched_tokens, sc.max_num_seqs, sc.max_model_len)
    activations = _peak_step_bytes(runner, dummy_requests(lengths, runner.block_size, worst), sample=True)
    graph_bytes = 0
    if runner.graph_sizes:
        decodes = dummy_requests([1] * runner.graph_sizes[-1], runner.block_size, worst)
        graph_bytes = _peak_step_bytes(runner, decodes, sample=False)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, total - free - torch.cuda.memory_reserved(device))
    profile = MemoryProfile(total, weights, activations, non_torch, graph_bytes)
    logger.info(
        "Memory profile (%d prompts, %d tokens): %.2f GiB total, weights %.2f GiB, peak activations %.2f GiB, "
        "non-torch %.2f GiB, CUDA-graph pool %.2f GiB; KV cache may take %.2f GiB at gpu_memory_utilization=%.2f",
        len(lengths), sum(lengths), total / GiB, weights / GiB, activations / GiB, non_torch / GiB,
        graph_bytes / GiB, kv_cache_budget(profile, runner.config.cache_config.gpu_memory_utilization) / GiB,
        runner.config.cache_config.gpu_memory_utilization,
    )
    return profile
