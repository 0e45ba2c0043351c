"""CUDA graphs for decode steps: captured once at start-up, replayed with padding.

A decode step launches a few hundred small kernels (per layer: norms, three matmuls, rotary,
the cache write, attention); for a small model the host cannot launch them as fast as the GPU
runs them. A CUDA graph records the whole forward once and replays it with one launch. Graphs
are fixed-shape, so, as in vLLM and nano-vllm:

- one graph per batch size in `capture_sizes` (1, 2, 4, then every 8 up to `max_num_seqs`),
  captured largest first into one shared memory pool (each graph's activations are dead
  once it returns, so they can all use the same memory);
- every graph reads its inputs from the same static buffers (`DecodeBuffers`: input ids,
  positions, slot mapping, block tables, sequence lengths), which a step fills before replay;
  the block tables are `cdiv(max_model_len, block_size)` wide, so one graph serves every
  sequence length;
- a batch of n decodes replays the smallest graph of at least n rows; the padding rows read
  and write only the padding block (one block past the scheduler's, never handed out), so a
  padded replay can never touch a live sequence's KV;
- anything else (a prefill or chunk, a mixed batch, more decodes than the largest graph,
  prompt logprobs) runs eagerly.

The graph itself sits behind a two-method seam (`capture(fn)`, `replay()`), so that the
padding, bucketing and static-buffer logic runs on CPU in the tests with `EagerGraph`, which
replays by calling the function again; `CudaGraph` is the real thing.
"""

from __future__ import annotations

import bisect
import time
from typing import Any, Callable, Protocol

import numpy as np
import torch

from pagedllm.attention.backend import AttentionBackend, AttentionMetadataBuilder
from pagedllm.scheduler_output import SchedulerOutput
from pagedllm.utils import cdiv
from pagedllm.logger import init_logger

logger = init_logger(__name__)

MAX_CAPTURE_SIZE = 512  # vLLM's default ceiling


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 24, ... up to max_num_seqs (itself included)."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in [1, 2, 4, *range(8, top + 1, 8)] if s <= top]
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def padded_batch_size(num_decodes: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds `num_decodes` rows, or None if none does."""
    i = bisect.bisect_left(sizes, num_decodes)
    return sizes[i] if i < len(sizes) else None


def cuda_graphs_wanted(device: torch.device, enforce_eager: bool, attn_backend: type[AttentionBackend]) -> bool:
    """On CUDA unless `enforce_eager`, for a backend whose decode path is fixed-shape under
    fixed-shape metadata (`AttentionBackend.supports_cuda_graphs`)."""
    if device.type != "cuda" or enforce_eager:
        return False
    if not attn_backend.supports_cuda_graphs:
        logger.info("CUDA graphs are off: the %s attention backend has no graph support", attn_backend.name)
        return False
    return True


# ----- the graph seam -----------------------------------------------------------------------
class Graph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor: ...

    def replay(self) -> torch.Tensor: ...


class CudaGraph:
    """`torch.cuda.CUDAGraph`: capture runs `fn` once under the graph (after a warm-up run
    that compiles Triton kernels and settles allocations), replay re-issues the same kernels."""

    def __init__(self, pool: tuple | None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.output: torch.Tensor | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        fn()  # warm-up, outside the graph
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = fn()
        torch.cuda.synchronize()
        return self.output

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class EagerGraph:
    """A stand-in that replays by calling `fn` again into the same output tensor: the
    padding and static-buffer logic around a graph, testable without a GPU."""

    def __init__(self, pool: tuple | None = None) -> None:
        self.fn: Callable[[], torch.Tensor] | None = None
        self.output: torch.Tensor | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        self.output = fn()
        return self.output

    def replay(self) -> torch.Tensor:
        self.output.copy_(self.fn())
        return self.output


# ----- static inputs ---------------------------------------------------------------------------
class DecodeBuffers:
    """The static inputs every decode graph reads, with a host-side twin for each.

    A step fills the host twins (pinned on CUDA, so the copies do not sync) and copies them
    over in one go. Row i < n is the i-th decode; rows n .. size - 1 are padding. Before the
    twins are rewritten, the previous copy out of them must have run: an event marks it (it has
    almost always passed already, since steps end by reading the sampled tokens back).
    """

    def __init__(self, max_batch: int, max_blocks: int, padding_block: int, block_size: int,
                 device: torch.device) -> None:
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.padding_block, self.block_size = padding_block, block_size
        pin = device.type == "cuda"
        # input ids, positions, slot mapping, sequence lengths: one int64 row each
        self.host_tokens = torch.zeros(4, max_batch, dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, pin_memory=pin)
        self.tokens = torch.zeros(4, max_batch, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.copied = torch.cuda.Event() if pin else None

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens[0]

    @property
    def positions(self) -> torch.Tensor:
        return self.tokens[1]

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self.tokens[2]

    def fill(self, token_ids: list[int], positions: list[int], block_ids: list[list[int]], size: int) -> None:
        """Write n decodes and size - n padding rows, then copy them to the device buffers."""
        n, bs = len(token_ids), self.block_size
        if self.copied is not None:
            self.copied.synchronize()
        tokens = self.host_tokens.numpy()
        tables = self.host_tables.numpy()
        pos = np.asarray(positions, dtype=np.int64)
        tables[:size] = self.padding_block
        for row, ids in enumerate(block_ids):
            count = min(len(ids), self.max_blocks)
            tables[row, :count] = ids[:count]
        tokens[0, :n] = token_ids
        tokens[1, :n] = pos
        tokens[2, :n] = tables[np.arange(n), pos // bs].astype(np.int64) * bs + pos % bs
        tokens[3, :n] = pos + 1
        # Padding rows: token 0 at position 0, written to and read from the padding block only.
        tokens[0:2, n:size] = 0
        tokens[2, n:size] = self.padding_block * bs
        tokens[3, n:size] = 1
        self.tokens.copy_(self.host_tokens, non_blocking=True)  # whole (contiguous, a few KiB): no staging copy
        self.seq_lens[:size].copy_(self.tokens[3, :size])
        self.block_tables[:size].copy_(self.host_tables[:size], non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def metadata(self, size: int, builder: AttentionMetadataBuilder) -> Any:
        """The backend's fixed-shape metadata over the first `size` rows: all decodes, block tables
        `max_blocks` wide, so one capture serves every sequence length."""
        return builder.build_for_cuda_graph(self.slot_mapping[:size], self.query_start_loc[: size + 1],
                                            self.seq_lens[:size], self.block_tables[:size],
                                            self.max_blocks * self.block_size)


# ----- the runner ----------------------------------------------------------------------------
class DecodeGraphRunner:
    """Captures the model's decode forward at every size in `sizes`; `run` replays one."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_model_len: int,
        sizes: list[int],
        padding_block: int,
        device: torch.device,
        metadata_builder: AttentionMetadataBuilder,
        graph_factory: Callable[[tuple | None], Graph] | None = None,
    ) -> None:
        self.model, self.kv_caches, self.sizes = model, kv_caches, sizes
        self.metadata_builder = metadata_builder
        self.buffers = DecodeBuffers(sizes[-1], cdiv(max_model_len, block_size), padding_block, block_size, device)
        self.device = device
        self.graph_factory = graph_factory or CudaGraph
        self.graphs: dict[int, Graph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0  # steps run through a graph (the GPU check reads it)
        self.capture_seconds, self.capture_bytes = 0.0, 0  # set by capture()

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first: the first capture sizes the shared pool, the rest fit inside it."""
        pool = torch.cuda.graph_pool_handle() if self.graph_factory is CudaGraph else None
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        for size in reversed(self.sizes):
            self.buffers.fill([], [], [], size)  # all padding: captures write the padding block only
            meta = self.buffers.metadata(size, self.metadata_builder)
            graph = self.graph_factory(pool)
            self.outputs[size] = graph.capture(
                lambda size=size, meta=meta: self.model(
                    self.buffers.input_ids[:size], self.buffers.positions[:size], self.kv_caches, meta)
            )
            self.graphs[size] = graph
        self.capture_seconds = time.perf_counter() - start
        if self.device.type == "cuda":
            self.capture_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]
            logger.info("Captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s, using %.2f GiB",
                        len(self.sizes), self.sizes[0], self.sizes[-1], self.capture_seconds, self.capture_bytes / 2**30)

    def can_run(self, sched: SchedulerOutput) -> bool:
        """Pure decode batches (one token each, no prompt logprobs) that fit a captured size."""
        if len(sched.scheduled) > self.sizes[-1]:
            return False
        return all(len(r.token_ids) == 1 and not r.compute_prompt_logprobs for r in sched.scheduled)

    def run(self, sched: SchedulerOutput) -> torch.Tensor:
        """Replay the graph for this batch; returns the hidden states of its rows, in
        `sched.scheduled` order (a view into the graph's static output)."""
        requests = sched.scheduled
        n = len(requests)
        size = padded_batch_size(n, self.sizes)
        self.buffers.fill(
            [r.token_ids[0] for r in requests], [r.num_computed_tokens for r in requests],
            [r.block_ids for r in requests], size,
        )
        self.num_replays += 1
        return self.graphs[size].replay()[:n]
