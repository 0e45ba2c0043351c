"""Draft-model proposals: a small model of the target's tokenizer guesses the next k tokens greedily.

The draft keeps its own paged KV cache, with the same number of blocks as the target's and read through the
same block tables, so a request's block i holds the draft's K/V for the same tokens as the target's: every
step the draft runs over exactly the rows the target ran (`mirror`, same positions, same slots), prefix-cache
hits included, since whoever filled a block filled both caches. Then, per sampled request, it feeds the new
token and its own guesses back k times (`propose`), writing their K/V at the positions past the sequence;
the scheduler reserves those slots (`num_lookahead_tokens`), and the next step's mirror overwrites whatever
the target did not keep. Drafts are the draft's argmax (vLLM's default `draft_sample_method="greedy"`): a
point-mass proposal, which the rejection sampler verifies exactly as it does n-gram drafts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagedllm.attention.backend import CommonAttentionMetadata
from pagedllm.config import EngineConfig
from pagedllm.model_executor.layers.build_context import BuildContext
from pagedllm.model_executor.model_loader import load_model
from pagedllm.scheduler_output import ScheduledRequest
from pagedllm.logger import init_logger
from pagedllm.utils import async_tensor_h2d

logger = init_logger(__name__)


class DraftModelProposer:
    def __init__(self, config: EngineConfig, ctx: BuildContext, metadata_builder: Any) -> None:
        spec = config.speculative_config
        self.model_config = spec.draft_model_config
        self.k = spec.num_speculative_tokens
        self.device = config.device
        self.block_size = config.cache_config.block_size
        self.max_model_len = config.model_config.max_model_len
        self.metadata_builder = metadata_builder
        self.model = load_model(self.model_config, self.device, ctx)
        logger.info("Speculative decoding: draft model %s proposes %d tokens per step", self.model_config.model, self.k)
        self.kv_caches: list = []

    def mirror(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any) -> None:
        """Run the draft over the step's rows, writing its K/V where the target wrote its own."""
        self.model(input_ids, positions, self.kv_caches, attn_metadata)

    def propose(self, requests: list[ScheduledRequest], last_tokens: list[int], num_tokens: list[int]
                ) -> list[list[int]]:
        """Up to k greedy draft tokens per request, after its `last_tokens` (the step's sampled token, at
        position num_tokens - 1); fewer near `max_model_len`."""
        bs = self.block_size
        drafts: list[list[int]] = [[] for _ in requests]
        active = sorted(range(len(requests)), key=lambda r: num_tokens[r])  # decode rows shortest first
        tokens = list(last_tokens)
        for i in range(self.k):
            active = [r for r in active if num_tokens[r] - 1 + i < self.max_model_len]
            if not active:
                break
            pos = np.array([num_tokens[r] - 1 + i for r in active], dtype=np.int64)
            block_ids = [requests[r].block_ids for r in active]
            slots = np.array([block_ids[j][p // bs] * bs + p % bs for j, p in enumerate(pos)], dtype=np.int64)
            meta = self.metadata_builder.build(CommonAttentionMetadata(
                query_lens=[1] * len(active), context_lens=pos.tolist(), block_ids=block_ids,
                num_decodes=len(active), slot_mapping=slots, block_size=bs))
            input_ids = async_tensor_h2d([tokens[r] for r in active], torch.long, self.device)
            hidden = self.model(input_ids, async_tensor_h2d(torch.from_numpy(pos), torch.long, self.device),
                                self.kv_caches, meta)
            guesses = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            for r, token in zip(active, guesses):
                drafts[r].append(token)
                tokens[r] = token
        return drafts
