"""The model runner: turns a `SchedulerOutput` into one flattened batch, runs the model, samples.

All scheduled tokens of all requests go through the model together as one sequence of
rows (`input_ids`, `positions`); `slot_mapping` says where each row's K/V is written, and
each request's block table says where its earlier K/V is read from. Logits are computed
only for rows where a token is due (the end of a request's known tokens) or whose prompt
logprobs were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.attention.metadata import AttentionMetadata, PrefillSequence, sequence_tensors
from pagedllm.attention.selector import get_attention_backend
from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.core.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprobs
from pagedllm.distributed.parallel_state import TensorParallelGroup
from pagedllm.model_executor.model_loader import load_model
from pagedllm.sample.metadata import build_sampling_metadata
from pagedllm.sample.sampler import Sampler, gather_logprobs
from pagedllm.utils import async_tensor_h2d
from pagedllm.worker.cpu_malloc import keep_freed_memory_in_heap, release_free_heap
from pagedllm.worker.cuda_graph_runner import DecodeGraphRunner, capture_sizes, cuda_graphs_wanted
from pagedllm.worker.kv_cache import allocate_kv_cache, determine_num_blocks
from pagedllm.worker.memory_profiler import needs_memory_profile, profile_memory


@dataclass
class ModelInputs:
    # None when a CUDA graph ran the step from its own static buffers
    input_ids: torch.Tensor | None
    positions: torch.Tensor | None
    attn_metadata: AttentionMetadata | None
    sample_rows: torch.Tensor  # hidden-state rows whose logits feed the sampler
    sample_requests: list[ScheduledRequest]
    # request -> (rows, first position, target token ids, top-k) for prompt logprobs
    prompt_logprob_rows: dict[str, tuple[torch.Tensor, int, torch.Tensor, int]]


# Decode batches are split into up to this many length groups (one attention call each).
MAX_DECODE_GROUPS = 4
MIN_DECODES_PER_GROUP = 8


def decode_groups(sorted_lens: list[int], block_size: int) -> list[tuple[int, int, int]]:
    """(first row, end row, blocks to read) for decodes sorted by length, in equal-count groups.

    Padding every decode to the longest one wastes gather and attention work on short
    sequences; a few groups recover most of it while keeping each call batched.
    """
    num = len(sorted_lens)
    if num == 0:
        return []
    num_groups = max(1, min(MAX_DECODE_GROUPS, num // MIN_DECODES_PER_GROUP))
    bounds = [round(i * num / num_groups) for i in range(num_groups + 1)]
    return [(s, e, cdiv(sorted_lens[e - 1], block_size)) for s, e in zip(bounds, bounds[1:])]


class ModelRunner:
    """One rank's runner. Under tensor parallelism every rank runs the same `execute_model` on the
    same `SchedulerOutput`, sampler included (its logits are the same on every rank); only rank 0's
    output is used, so the other ranks' samples never matter."""

    def __init__(self, config: EngineConfig, tp_group: TensorParallelGroup | None = None) -> None:
        self.config = config
        self.device = config.device
        self.block_size = config.cache_config.block_size
        self.vocab_size = config.model_config.vocab_size
        self.tp_group = tp_group or TensorParallelGroup()
        tp_size = self.tp_group.world_size
        if self.device.type == "cpu":
            keep_freed_memory_in_heap()  # large activations stop page-faulting in every step
        self.attn_backend = get_attention_backend(self.device)
        if hasattr(self.attn_backend, "prepare"):
            self.attn_backend.prepare(self.device)  # e.g. build the CPU kernel now, not in step 1
        self.model = load_model(config.model_config, self.device, self.tp_group)
        if self.device.type == "cpu":
            release_free_heap()  # loading's peak (checkpoint tensors, replaced plain weights) is not needed again
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(config.model_config.seed))
        self.generators: dict[str, torch.Generator] = {}  # per-request, for seeded requests
        use_graphs = cuda_graphs_wanted(self.device, config.model_config.enforce_eager, self.attn_backend)
        self.graph_sizes = capture_sizes(config.scheduler_config.max_num_seqs) if use_graphs else []
        self.memory_profile = profile_memory(self) if needs_memory_profile(self.device, config.cache_config) else None
        self.num_blocks = determine_num_blocks(
            config.model_config, config.cache_config, config.scheduler_config, self.device, tp_size,
            profile=self.memory_profile,
        )
        # One block more than the scheduler hands out: the padding block, which padded rows
        # of a CUDA-graph replay write to (never a live sequence's block).
        self.kv_caches = allocate_kv_cache(
            config.model_config, self.num_blocks + 1, self.block_size, self.device, tp_size,
            config.kv_cache_dtype,
        )
        self.cuda_graphs: DecodeGraphRunner | None = None
        if use_graphs:
            self.cuda_graphs = DecodeGraphRunner(
                self.model, self.kv_caches, self.block_size, config.model_config.max_model_len, self.graph_sizes,
                padding_block=self.num_blocks, device=self.device,
            )
            self.cuda_graphs.capture()

    # ----- batch construction -------------------------------------------------------
    def prepare_inputs(self, sched: SchedulerOutput) -> ModelInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSequence] = []
        sample_rows: list[int] = []
        sample_requests: list[ScheduledRequest] = []
        prompt_rows: dict[str, tuple[torch.Tensor, int, torch.Tensor, int]] = {}

        # Decodes first, shortest first, so they form contiguous rows that split into
        # groups of similar length; then prefills and chunks. Per-request arithmetic stays in
        # NumPy: a few dozen torch calls per request cost more than the step's small ops.
        decodes = sorted((r for r in sched.scheduled if len(r.token_ids) == 1), key=lambda r: r.num_computed_tokens)
        ordered = decodes + [r for r in sched.scheduled if len(r.token_ids) != 1]
        for req in ordered:
            start, n = req.num_computed_tokens, len(req.token_ids)
            row = len(input_ids)
            input_ids.extend(req.token_ids)
            pos = np.arange(start, start + n)
            positions.append(pos)
            block_ids = np.asarray(req.block_ids[: cdiv(start + n, bs)], dtype=np.int64)
            slots.append(block_ids[pos // bs] * bs + pos % bs)
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(req.block_ids[: cdiv(start + 1, bs)])
                decode_lens.append(start + 1)
            else:
                prefills.append(PrefillSequence(row, n, start, async_tensor_h2d(torch.from_numpy(block_ids), torch.long,
                                                                                self.device)))
            if req.sample:
                sample_rows.append(row + n - 1)
                sample_requests.append(req)
            if req.compute_prompt_logprobs:
                # Row i predicts prompt token at position start + i + 1.
                last = min(start + n, len(req.prompt_token_ids) - 1)
                targets = torch.tensor(req.prompt_token_ids[start + 1 : last + 1], dtype=torch.long)
                k = self._num_logprobs(req.sampling_params.prompt_logprobs)
                prompt_rows[req.request_id] = (torch.arange(row, row + last - start), start, targets, k)

        dev = self.device
        max_blocks = max((len(t) for t in decode_tables), default=0)
        tables = np.array([t + [t[0]] * (max_blocks - len(t)) for t in decode_tables], dtype=np.int64)
        lens = np.asarray(decode_lens, dtype=np.int64)
        key_mask = np.arange(max_blocks * bs)[None, :] < lens[:, None]
        query_start_loc = seq_lens = block_tables = None
        if getattr(self.attn_backend, "uses_sequence_tensors", False):
            query_start_loc, seq_lens, block_tables = sequence_tensors(
                [len(r.token_ids) for r in ordered], [r.num_computed_tokens + len(r.token_ids) for r in ordered],
                [r.block_ids for r in ordered], bs, dev,
            )
        meta = AttentionMetadata(
            slot_mapping=async_tensor_h2d(torch.from_numpy(np.concatenate(slots)), torch.long, dev),
            decode_token_idx=async_tensor_h2d(decode_rows, torch.long, dev),
            decode_block_tables=async_tensor_h2d(torch.from_numpy(tables.reshape(len(decode_tables), max_blocks)),
                                                 torch.long, dev),
            decode_key_mask=async_tensor_h2d(torch.from_numpy(key_mask), torch.bool, dev),
            prefills=prefills,
            num_tokens=len(input_ids),
            decode_groups=decode_groups(decode_lens, bs),
            decode_seq_lens=async_tensor_h2d(torch.from_numpy(lens), torch.long, dev),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
        )
        return ModelInputs(
            input_ids=async_tensor_h2d(input_ids, torch.long, dev),
            positions=async_tensor_h2d(torch.from_numpy(np.concatenate(positions)), torch.long, dev),
            attn_metadata=meta,
            sample_rows=async_tensor_h2d(sample_rows, torch.long, dev),
            sample_requests=sample_requests,
            prompt_logprob_rows=prompt_rows,
        )

    # ----- one step ---------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in sched.finished_req_ids:
            self.generators.pop(request_id, None)
        if sched.is_empty:
            return ModelRunnerOutput()
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(sched):
            hidden = self.cuda_graphs.run(sched)  # row i is sched.scheduled[i]
            inputs = self._replayed_inputs(sched)
        else:
            inputs = self.prepare_inputs(sched)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_metadata)
        out = ModelRunnerOutput()
        if inputs.sample_requests:
            self._sample(hidden, inputs, out)
        for request_id, (rows, first_pos, targets, k) in inputs.prompt_logprob_rows.items():
            out.prompt_logprobs[request_id] = (first_pos, self._prompt_logprobs(hidden, rows, targets, k))
        return out

    def _replayed_inputs(self, sched: SchedulerOutput) -> ModelInputs:
        """What sampling needs from a graph-replayed decode batch (one row per request, in order)."""
        rows = [i for i, r in enumerate(sched.scheduled) if r.sample]
        return ModelInputs(None, None, None, async_tensor_h2d(rows, torch.long, self.device),
                           [sched.scheduled[i] for i in rows], {})

    def _sample(self, hidden: torch.Tensor, inputs: ModelInputs, out: ModelRunnerOutput) -> None:
        requests = inputs.sample_requests
        for req in requests:
            seed = req.sampling_params.seed
            if seed is not None and req.request_id not in self.generators:
                self.generators[req.request_id] = torch.Generator(self.device).manual_seed(seed)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        meta = build_sampling_metadata(requests, self.generators, self.vocab_size, self.device)
        result = self.sampler(logits, meta)
        sampled = result.sampled_token_ids.tolist()
        if result.logprobs is not None:
            ids, lps, ranks = result.logprob_token_ids.tolist(), result.logprobs.tolist(), result.ranks.tolist()
        for i, req in enumerate(requests):
            out.sampled_token_ids[req.request_id] = sampled[i]
            if req.sampling_params.logprobs is not None:
                k = self._num_logprobs(req.sampling_params.logprobs)
                out.logprobs[req.request_id] = TokenLogprobs([ids[i][: k + 1]], [lps[i][: k + 1]], [ranks[i][: k + 1]])

    def _num_logprobs(self, k: int) -> int:
        """vLLM's -1 means the whole vocabulary."""
        return self.vocab_size if k == -1 else k

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, k: int) -> TokenLogprobs:
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows.to(self.device)]).float(), dim=-1)
        ids, lps, ranks = gather_logprobs(logprobs, targets.to(self.device), k)
        return TokenLogprobs(ids.tolist(), lps.tolist(), ranks.tolist())
