"""The model runner: turns a `SchedulerOutput` into one flattened batch, runs the model, samples.

All scheduled tokens of all requests go through the model together as one sequence of
rows (`input_ids`, `positions`); `slot_mapping` says where each row's K/V is written, and
each request's block table says where its earlier K/V is read from. The attention backend's
metadata builder turns that description into what its kernels read. Logits are computed
only for rows where a token is due (the end of a request's known tokens) or whose prompt
logprobs were asked for.

A pooling model (`runner="pooling"`) samples nothing: the rows of each pooling request (its whole
prompt, run in one step) go to the model's pooler (`layers/pooler.py`), and the pooled vectors go
back in `ModelRunnerOutput.pooler_output`. An encoder-only model (BERT) gets no KV cache and no
paged-attention metadata: its attention is bidirectional over each prompt of the step
(`attention/encoder_attention.py`), and its token-type ids ride along for a (query, document) pair.

Its life has two phases, as a worker's in vLLM: built, it holds the model (loaded) and nothing
else; `initialize_kv_cache` then allocates the number of blocks the engine core settled on (after
`Worker.determine_available_memory`) and captures the CUDA graphs that read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from pagedllm.attention.backend import CommonAttentionMetadata
from pagedllm.attention.encoder_attention import EncoderAttentionMetadata
from pagedllm.attention.selector import get_attention_backend
from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import PipelineParallelGroup, TensorParallelGroup
from pagedllm.lora.layers import LoRALinearMethod
from pagedllm.lora.model_manager import LoRAModelManager
from pagedllm.lora.punica import PunicaWrapper
from pagedllm.model_executor.kv_cache_groups import kv_cache_groups_for, layer_to_tensor
from pagedllm.model_executor.layers.build_context import BuildContext
from pagedllm.model_executor.layers.pooler import PoolingMetadata
from pagedllm.model_executor.model_loader import load_model
from pagedllm.sample.metadata import build_sampling_metadata
from pagedllm.sample.sampler import Sampler, gather_logprobs, seeded_generator
from pagedllm.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprobs
from pagedllm.spec_decode.draft_model_proposer import DraftModelProposer
from pagedllm.spec_decode.eagle_proposer import EagleProposer
from pagedllm.spec_decode.ngram_proposer import NgramProposer
from pagedllm.spec_decode.rejection_sampler import RejectionSampler, accepted_runs, expand_rows
from pagedllm.utils import async_tensor_h2d, cdiv
from pagedllm.worker.cpu_malloc import keep_freed_memory_in_heap, release_free_heap
from pagedllm.multimodal.inputs import MultiModalFeature
from pagedllm.worker.cuda_graph_runner import DecodeGraphRunner, capture_sizes, cuda_graphs_wanted
from pagedllm.worker.encoder_cache import EncoderCache, scatter_image_rows
from pagedllm.worker.kv_cache import KVCaches, allocate_kv_cache


@dataclass
class ModelInputs:
    # None when a CUDA graph ran the step from its own static buffers
    input_ids: torch.Tensor | None
    positions: torch.Tensor | None
    attn_metadata: Any  # the attention backend's own metadata
    sample_rows: torch.Tensor  # hidden-state rows whose logits feed the sampler
    sample_requests: list[ScheduledRequest]
    # request -> (rows, first position, target token ids, top-k) for prompt logprobs
    prompt_logprob_rows: dict[str, tuple[torch.Tensor, int, torch.Tensor, int]]
    # pooling requests of the step: their ids and where their rows are
    pooling_request_ids: Optional[list[str]] = None
    pooling_metadata: Optional[PoolingMetadata] = None
    token_type_ids: Optional[torch.Tensor] = None  # an encoder's segment ids, when a request has two
    # images of the step: (first row of the request, its first position, its tokens, the image)
    mm_placements: list[tuple[int, int, int, MultiModalFeature]] = dataclasses.field(default_factory=list)
    # the scheduled requests in row order (an EAGLE head re-reads the step's rows per request)
    ordered: list[ScheduledRequest] = dataclasses.field(default_factory=list)


class ModelRunner:
    """One rank's runner. Under tensor parallelism every rank runs the same `execute_model` on the
    same `SchedulerOutput`, sampler included (its logits are the same on every rank); only rank 0's
    output is used, so the other ranks' samples never matter. Under pipeline parallelism every stage
    prepares the same batch; the model passes hidden states from stage to stage, and only the last
    stage samples (the others return an empty output once their layers have run)."""

    def __init__(self, config: EngineConfig, tp_group: TensorParallelGroup | None = None,
                 pp_group: PipelineParallelGroup | None = None) -> None:
        self.config = config
        self.device = config.device
        self.block_size = config.cache_config.block_size
        self.vocab_size = config.model_config.vocab_size
        self.tp_group = tp_group or TensorParallelGroup()
        self.pp_group = pp_group or PipelineParallelGroup()
        first_layer, end_layer = self.pp_group.layer_range(config.model_config.num_layers)
        # A pipeline stage caches only its layers' K/V (None: this worker runs every layer).
        self.stage_layers = end_layer - first_layer if self.pp_group.world_size > 1 else None
        # Local and global layers each read K/V through their own group's block table.
        groups = kv_cache_groups_for(config.model_config.text_config)
        self.num_kv_cache_groups = len(groups)
        self.layer_group = [g for _, (g, _) in sorted(layer_to_tensor(groups).items())]
        if self.device.type == "cpu":
            keep_freed_memory_in_heap()  # large activations stop page-faulting in every step
        mc = config.model_config
        self.attn_backend = get_attention_backend(self.device)
        self.attn_backend.prepare(self.device)  # e.g. build the CPU kernel now, not in step 1
        self.attn_metadata_builder = self.attn_backend.get_builder_cls()(self.device, mc.dtype, config.kv_cache_dtype)
        ctx = BuildContext.for_engine(mc.dtype, mc.max_model_len, self.device, mc.quantization, mc.compile_fused_ops,
                                      self.attn_backend, self.tp_group, self.pp_group,
                                      config.parallel_config.enable_expert_parallel, mc.quant_config)
        base_ctx = ctx
        lora_config = config.lora_config
        self.punica: PunicaWrapper | None = None
        if lora_config is not None:  # the decoder layers' projections add their adapters' terms
            self.punica = PunicaWrapper(lora_config.max_loras, self.device)
            methods = ctx.linear_methods
            ctx = dataclasses.replace(ctx, linear_methods=dataclasses.replace(
                methods, linear=LoRALinearMethod(methods.linear, self.punica)))
        self.model = load_model(mc, self.device, ctx)
        self.lora_manager = (LoRAModelManager(self.model, lora_config, mc.hf_config, self.device, mc.dtype)
                             if lora_config is not None else None)
        if self.device.type == "cpu":
            release_free_heap()  # loading's peak (checkpoint tensors, replaced plain weights) is not needed again
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(mc.seed))
        self.generators: dict[str, torch.Generator] = {}  # per-request, for seeded requests
        # Speculative decoding: the proposer of each request's next drafts, and the sampler that verifies them.
        spec = config.speculative_config
        self.drafter: NgramProposer | DraftModelProposer | EagleProposer | None = None
        if spec is not None and spec.method == "draft_model":
            self.drafter = DraftModelProposer(config, base_ctx, self.attn_metadata_builder)
        elif spec is not None and spec.method == "eagle":
            self.drafter = EagleProposer(config, base_ctx, self.attn_metadata_builder, self.model)
        elif spec is not None:
            self.drafter = NgramProposer(spec)
        self.rejection_sampler = RejectionSampler(self.sampler.generator)
        self.is_pooling_model = mc.runner_type == "pooling"
        self.is_encoder_only = bool(getattr(self.model, "is_encoder_only", False))
        # A vision-language model's encoder outputs, per image (budget: a few steps' worth of rows).
        self.encoder_cache = (EncoderCache(max(4 * config.scheduler_config.max_num_batched_tokens, 8192))
                              if hasattr(self.model, "embed_images") else None)
        # Graphs replay decode steps, which a pooling model never has.
        use_graphs = cuda_graphs_wanted(self.device, mc.enforce_eager, self.attn_backend) and not self.is_pooling_model
        use_graphs = use_graphs and lora_config is None  # graphs would replay without the step's LoRA mapping
        use_graphs = use_graphs and self.pp_group.world_size == 1  # a stage's forward sends and receives
        use_graphs = use_graphs and self.num_kv_cache_groups == 1  # a graph's buffers hold one block table
        # a draft model's mirror and an EAGLE head need the step's inputs (and the head every row's hidden state)
        use_graphs = use_graphs and not isinstance(self.drafter, (DraftModelProposer, EagleProposer))
        self.graph_sizes = capture_sizes(config.scheduler_config.max_num_seqs) if use_graphs else []
        self.num_blocks = 0  # until initialize_kv_cache
        self.kv_caches: KVCaches = []
        self.cuda_graphs: DecodeGraphRunner | None = None

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate `num_blocks` blocks per layer (the scheduler's pool), then capture the graphs."""
        self.num_blocks = num_blocks
        if self.is_encoder_only:
            return  # an encoder keeps no K/V: the scheduler's blocks are only counted
        # One block more than the scheduler hands out: the padding block, which padded rows
        # of a CUDA-graph replay write to (never a live sequence's block).
        self.kv_caches = allocate_kv_cache(self.config.model_config, num_blocks + 1, self.block_size, self.device,
                                           self.tp_group.world_size, self.config.kv_cache_dtype, self.stage_layers)
        if isinstance(self.drafter, (DraftModelProposer, EagleProposer)):  # its own K/V under the same block ids
            self.drafter.kv_caches = allocate_kv_cache(self.drafter.model_config, num_blocks + 1, self.block_size,
                                                       self.device, 1, self.config.kv_cache_dtype)
        if self.graph_sizes:
            self.cuda_graphs = DecodeGraphRunner(
                self.model, self.kv_caches, self.block_size, self.config.model_config.max_model_len, self.graph_sizes,
                padding_block=num_blocks, device=self.device, metadata_builder=self.attn_metadata_builder,
            )
            self.cuda_graphs.capture()

    # ----- batch construction -------------------------------------------------------
    def prepare_inputs(self, sched: SchedulerOutput) -> ModelInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[list[np.ndarray]] = [[] for _ in range(self.num_kv_cache_groups)]
        sample_rows: list[int] = []
        sample_requests: list[ScheduledRequest] = []
        prompt_rows: dict[str, tuple[torch.Tensor, int, torch.Tensor, int]] = {}
        pooling_ids: list[str] = []
        pooling = PoolingMetadata([], [], [])
        mm_placements: list[tuple[int, int, int, MultiModalFeature]] = []
        token_types: list[tuple[int, int, int]] = []  # (first row, rows, where segment 1 starts in the prompt)

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
            for group_slots, table in zip(slots, self._block_tables(req)):
                block_ids = np.asarray(table[: cdiv(start + n, bs)], dtype=np.int64)
                group_slots.append(block_ids[pos // bs] * bs + pos % bs)
            mm_placements.extend((row, start, n, feature) for feature in req.mm_features)
            if req.sample:  # the last row, and before it one row per draft token
                sample_rows.extend(range(row + n - 1 - len(req.spec_token_ids), row + n))
                sample_requests.append(req)
            if req.pooling_params is not None and start == 0 and n == len(req.prompt_token_ids):  # the whole prompt
                pooling_ids.append(req.request_id)
                pooling.starts.append(row)
                pooling.lens.append(n)
                pooling.params.append(req.pooling_params)
                boundary = req.pooling_params.token_type_boundary
                if boundary is not None:
                    token_types.append((row, n, boundary))
            if req.compute_prompt_logprobs:
                # Row i predicts prompt token at position start + i + 1.
                last = min(start + n, len(req.prompt_token_ids) - 1)
                targets = torch.tensor(req.prompt_token_ids[start + 1 : last + 1], dtype=torch.long)
                k = self._num_logprobs(req.sampling_params.prompt_logprobs)
                prompt_rows[req.request_id] = (torch.arange(row, row + last - start), start, targets, k)

        if self.punica is not None:
            self.punica.update(self._lora_indices(ordered))
        commons = [CommonAttentionMetadata(
            query_lens=[len(r.token_ids) for r in ordered],
            context_lens=[r.num_computed_tokens for r in ordered],
            block_ids=[self._block_tables(r)[g] for r in ordered],
            num_decodes=len(decodes),
            slot_mapping=np.concatenate(group_slots),
            block_size=bs,
        ) for g, group_slots in enumerate(slots)]
        common = commons[0]
        dev = self.device
        token_type_ids = None
        if token_types and self.is_encoder_only:
            types = np.zeros(len(input_ids), dtype=np.int64)
            for first, n, boundary in token_types:
                types[first + boundary : first + n] = 1
            token_type_ids = async_tensor_h2d(torch.from_numpy(types), torch.long, dev)
        return ModelInputs(
            input_ids=async_tensor_h2d(input_ids, torch.long, dev),
            positions=async_tensor_h2d(torch.from_numpy(np.concatenate(positions)), torch.long, dev),
            attn_metadata=(EncoderAttentionMetadata.build(common.query_lens, dev) if self.is_encoder_only
                           else self._build_attn_metadata(commons)),
            sample_rows=async_tensor_h2d(sample_rows, torch.long, dev),
            sample_requests=sample_requests,
            prompt_logprob_rows=prompt_rows,
            pooling_request_ids=pooling_ids,
            pooling_metadata=pooling if pooling_ids else None,
            token_type_ids=token_type_ids,
            mm_placements=mm_placements,
            ordered=ordered,
        )

    def _block_tables(self, req: ScheduledRequest) -> tuple[list[int], ...]:
        """The request's block table of each KV-cache group (a made-up request may give one for all)."""
        return req.group_block_ids or (req.block_ids,) * self.num_kv_cache_groups

    def _build_attn_metadata(self, commons: list[CommonAttentionMetadata]) -> Any:
        """One metadata for every layer; with several KV-cache groups, a list of each layer's group's."""
        metas = [self.attn_metadata_builder.build(common) for common in commons]
        return metas[0] if len(metas) == 1 else [metas[g] for g in self.layer_group]

    def _lora_indices(self, ordered: list[ScheduledRequest]) -> Optional[torch.Tensor]:
        """Each row's adapter slot (-1: the base model), the adapters put into their slots first;
        None when no request of the step has an adapter."""
        loras = [r.lora_request for r in ordered if r.lora_request is not None]
        if not loras:
            return None
        slot_of = self.lora_manager.activate(loras)
        slots = [-1 if r.lora_request is None else slot_of[r.lora_request.lora_int_id] for r in ordered]
        rows = np.repeat(np.asarray(slots, dtype=np.int64), [len(r.token_ids) for r in ordered])
        return async_tensor_h2d(torch.from_numpy(rows), torch.long, self.device)

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
            hidden = self._forward(inputs, self.kv_caches)
            if isinstance(self.drafter, DraftModelProposer):
                self.drafter.mirror(inputs.input_ids, inputs.positions, inputs.attn_metadata)
        out = ModelRunnerOutput()
        if not self.pp_group.is_last:
            return out  # this stage's hidden states went on to the next one
        if inputs.pooling_metadata is not None:
            pooled = self.model.pooler(hidden, inputs.pooling_metadata)
            out.pooler_output = dict(zip(inputs.pooling_request_ids, pooled))
        if self.is_pooling_model:
            return out  # nothing to sample: a pooling model has no LM head to use
        if inputs.sample_requests:
            self._sample(hidden, inputs, out, (sched.grammar_bitmask, sched.structured_output_request_ids))
        for request_id, (rows, first_pos, targets, k) in inputs.prompt_logprob_rows.items():
            out.prompt_logprobs[request_id] = (first_pos, self._prompt_logprobs(hidden, rows, targets, k))
        if isinstance(self.drafter, EagleProposer):  # every step, sampled or not: the head's K/V follows the target's
            wanted = {r.request_id for r in inputs.sample_requests if r.sampling_params.structured_outputs is None}
            out.draft_token_ids.update({rid: d for rid, d in self.drafter.propose(
                inputs.ordered, inputs.input_ids, inputs.positions, inputs.attn_metadata, hidden,
                out.sampled_token_ids, out.num_accepted_tokens, wanted).items() if d})
        return out

    @torch.inference_mode()
    def dummy_step(self, requests: list[ScheduledRequest], kv_caches: KVCaches, sample: bool) -> None:
        """One eager step over made-up `requests` into throw-away `kv_caches` (the memory profile's)."""
        inputs = self.prepare_inputs(SchedulerOutput(requests, sum(len(r.token_ids) for r in requests)))
        hidden = self._forward(inputs, kv_caches)
        if sample and not self.is_pooling_model and self.pp_group.is_last:
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
            self.sampler(logits, build_sampling_metadata(requests, {}, self.vocab_size, self.device))

    def _forward(self, inputs: ModelInputs, kv_caches: KVCaches) -> torch.Tensor:
        if self.is_encoder_only:
            return self.model(inputs.input_ids, inputs.positions, [], inputs.attn_metadata, inputs.token_type_ids)
        if inputs.mm_placements:  # images' encoder rows replace their placeholders' embeddings
            rows_of = self.encoder_cache.get_many([f for *_, f in inputs.mm_placements], self.model.embed_images,
                                                  self.device)
            inputs_embeds = self.model.embed_input_ids(inputs.input_ids)
            scatter_image_rows(inputs_embeds, inputs.mm_placements, rows_of)
            return self.model(inputs.input_ids, inputs.positions, kv_caches, inputs.attn_metadata,
                              inputs_embeds=inputs_embeds)
        return self.model(inputs.input_ids, inputs.positions, kv_caches, inputs.attn_metadata)

    def allocate_dummy_kv_caches(self, num_blocks: int) -> KVCaches:
        return allocate_kv_cache(self.config.model_config, num_blocks, self.block_size, self.device,
                                 self.tp_group.world_size, self.config.kv_cache_dtype, self.stage_layers)

    def _replayed_inputs(self, sched: SchedulerOutput) -> ModelInputs:
        """What sampling needs from a graph-replayed decode batch (one row per request, in order)."""
        rows = [i for i, r in enumerate(sched.scheduled) if r.sample]
        return ModelInputs(None, None, None, async_tensor_h2d(rows, torch.long, self.device),
                           [sched.scheduled[i] for i in rows], {})

    def _sample(self, hidden: torch.Tensor, inputs: ModelInputs, out: ModelRunnerOutput,
                grammar: tuple[Optional[np.ndarray], dict[str, int]] = (None, {})) -> None:
        requests = inputs.sample_requests
        for req in requests:
            seed = req.sampling_params.seed
            if seed is not None and req.request_id not in self.generators:
                self.generators[req.request_id] = seeded_generator(seed, self.device)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        if any(req.spec_token_ids for req in requests):
            self._verify_drafts(logits, requests, out, grammar)
        else:
            self._sample_logits(logits, requests, out, grammar)
        if self.drafter is not None and not isinstance(self.drafter, EagleProposer):  # EAGLE: after sampling
            self._propose_drafts(requests, out)

    def _sample_logits(self, logits: torch.Tensor, requests: list[ScheduledRequest], out: ModelRunnerOutput,
                       grammar: tuple[Optional[np.ndarray], dict[str, int]]) -> None:
        meta = build_sampling_metadata(requests, self.generators, self.vocab_size, self.device, grammar)
        result = self.sampler(logits, meta)
        sampled = result.sampled_token_ids.tolist()
        if result.logprobs is not None:
            ids, lps, ranks = result.logprob_token_ids.tolist(), result.logprobs.tolist(), result.ranks.tolist()
        for i, req in enumerate(requests):
            out.sampled_token_ids[req.request_id] = sampled[i]
            if req.sampling_params.logprobs is not None:
                k = self._num_logprobs(req.sampling_params.logprobs)
                out.logprobs[req.request_id] = TokenLogprobs([ids[i][: k + 1]], [lps[i][: k + 1]], [ranks[i][: k + 1]])

    def _verify_drafts(self, logits: torch.Tensor, requests: list[ScheduledRequest], out: ModelRunnerOutput,
                       grammar: tuple[Optional[np.ndarray], dict[str, int]]) -> None:
        """Speculative decoding: keep each request's drafts up to the first one the rejection sampler rejects,
        then the token sampled after them (`spec_decode/rejection_sampler.py`)."""
        rows, drafts = expand_rows(requests)
        meta = build_sampling_metadata(rows, self.generators, self.vocab_size, self.device, grammar)
        result = self.rejection_sampler(logits, meta, torch.tensor(drafts, device=self.device))
        accepted, tokens = result.accepted.tolist(), result.output_token_ids.tolist()
        if result.logprobs is not None:
            ids, lps, ranks = result.logprob_token_ids.tolist(), result.logprobs.tolist(), result.ranks.tolist()
        for req, (first, num_accepted) in zip(requests, accepted_runs(requests, accepted)):
            last = first + num_accepted
            out.sampled_token_ids[req.request_id] = tokens[last]
            if req.spec_token_ids:
                out.num_accepted_tokens[req.request_id] = num_accepted
            if req.sampling_params.logprobs is not None:
                k = self._num_logprobs(req.sampling_params.logprobs) + 1
                out.logprobs[req.request_id] = TokenLogprobs([r[:k] for r in ids[first : last + 1]],
                                                             [r[:k] for r in lps[first : last + 1]],
                                                             [r[:k] for r in ranks[first : last + 1]])

    def _propose_drafts(self, requests: list[ScheduledRequest], out: ModelRunnerOutput) -> None:
        """Each sampled request's drafts for its next step, from its tokens after this one (none for a request
        whose grammar constrains it: the scheduler would drop them)."""
        requests = [req for req in requests if req.sampling_params.structured_outputs is None]
        if isinstance(self.drafter, DraftModelProposer):
            # The sampled token sits at position num_computed_tokens + real tokens fed + drafts accepted.
            num_tokens = [req.num_computed_tokens + len(req.token_ids) - len(req.spec_token_ids) + 1
                          + out.num_accepted_tokens.get(req.request_id, 0) for req in requests]
            proposals = self.drafter.propose(requests, [out.sampled_token_ids[r.request_id] for r in requests],
                                             num_tokens)
            out.draft_token_ids.update({r.request_id: d for r, d in zip(requests, proposals) if d})
            return
        for req in requests:
            new = req.spec_token_ids[: out.num_accepted_tokens.get(req.request_id, 0)]
            new.append(out.sampled_token_ids[req.request_id])
            context = np.array(req.prompt_token_ids + req.output_token_ids + new, dtype=np.int64)
            drafts = self.drafter.propose(context)
            if drafts:
                out.draft_token_ids[req.request_id] = drafts

    def _num_logprobs(self, k: int) -> int:
        """vLLM's -1 means the whole vocabulary."""
        return self.vocab_size if k == -1 else k

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, k: int) -> TokenLogprobs:
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows.to(self.device)]).float(), dim=-1)
        ids, lps, ranks = gather_logprobs(logprobs, targets.to(self.device), k)
        return TokenLogprobs(ids.tolist(), lps.tolist(), ranks.tolist())
