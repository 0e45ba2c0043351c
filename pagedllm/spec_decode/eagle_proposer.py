"""EAGLE proposals: a one-layer head on the target's hidden states guesses the next k tokens greedily.

The head at position p reads (the token at p + 1, the target's hidden state h_p) and guesses the token at
p + 2 (`models/eagle.py`). Like a draft model it keeps its own paged K/V cache, one layer, read through the
target's block tables, so every step it first runs over the rows the target just ran (`propose`, first
pass), shifted by one token: row p gets the token of row p + 1, and a request's last row the token that
follows it, the one just sampled, or for a prompt chunk that samples nothing the next prompt token (as vLLM
feeds `next_token_ids`). Rows past a request's last accepted draft get whatever follows them in the step;
their K/V sits at positions the next step computes again, and no row of this pass reads them (attention is
causal). The head's output at the last accepted row gives the first draft; then k - 1 chained one-token
steps feed each guess back with the head's own output hidden state in place of the target's, writing K/V in
the slots the scheduler reserves past the sequence (`num_lookahead_tokens`), which the next step's first
pass overwrites. Drafts are the head's argmax, a point mass, verified by the same rejection sampler.

One approximation, of acceptance never of output: a prefix-cache hit brings the head's K/V of the cached
block's last position as the request that filled it computed it, from that request's next token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from pagedllm.attention.backend import CommonAttentionMetadata
from pagedllm.config import EngineConfig
from pagedllm.logger import init_logger
from pagedllm.model_executor.layers.build_context import BuildContext
from pagedllm.model_executor.layers.quantization import get_linear_methods
from pagedllm.model_executor.models.eagle import load_eagle_head
from pagedllm.scheduler_output import ScheduledRequest
from pagedllm.utils import async_tensor_h2d

logger = init_logger(__name__)


class EagleProposer:
    def __init__(self, config: EngineConfig, ctx: BuildContext, metadata_builder: Any, target: nn.Module) -> None:
        spec = config.speculative_config
        self.model_config = spec.draft_model_config  # the head's (its KV cache is sized from it)
        self.k = spec.num_speculative_tokens
        self.device = config.device
        self.block_size = config.cache_config.block_size
        self.max_model_len = config.model_config.max_model_len
        self.metadata_builder = metadata_builder
        # The head's checkpoint is a plain one whatever the target's weights are (GGUF blocks, GPTQ, int8):
        # it gets the unquantized linear methods, not the target's.
        ctx = dataclasses.replace(ctx, linear_methods=get_linear_methods(None, config.model_config.dtype, self.device))
        self.model = load_eagle_head(self.model_config.model, self.model_config.hf_config, config.model_config.dtype,
                                     self.device, ctx, target)
        logger.info("Speculative decoding: EAGLE head %s proposes %d tokens per step", self.model_config.model, self.k)
        self.kv_caches: list = []

    def propose(self, ordered: list[ScheduledRequest], input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: Any, target_hidden: torch.Tensor, sampled: dict[str, int],
                num_accepted: dict[str, int], wanted: set[str]) -> dict[str, list[int]]:
        """Run the head over the step's rows (`ordered`, the runner's row order), then draft up to k tokens for
        each request in `wanted` (sampled this step, and allowed drafts); `sampled` and `num_accepted` are the
        step's outcome per request."""
        shifted = input_ids.tolist()[1:] + [0]
        last_rows: dict[str, tuple[int, int]] = {}  # request -> (its last accepted row, that row's position)
        row = 0
        for req in ordered:
            n = len(req.token_ids)
            kept = n - len(req.spec_token_ids) + num_accepted.get(req.request_id, 0)
            last = row + kept - 1
            if req.request_id in sampled:
                shifted[last] = sampled[req.request_id]
            else:  # a prompt chunk: the token after it is the prompt's next one
                known = req.prompt_token_ids + req.output_token_ids
                nxt = req.num_computed_tokens + n
                shifted[last] = known[nxt] if nxt < len(known) else 0
            if req.request_id in wanted:
                last_rows[req.request_id] = (last, req.num_computed_tokens + kept - 1)
            row += n
        hidden = self.model(async_tensor_h2d(shifted, torch.long, self.device), positions, target_hidden,
                            self.kv_caches, attn_metadata)
        if not last_rows:
            return {}
        requests = [req for req in ordered if req.request_id in last_rows]
        rows = async_tensor_h2d([last_rows[r.request_id][0] for r in requests], torch.long, self.device)
        hidden = hidden[rows]
        tokens = self.model.compute_logits(hidden).argmax(dim=-1)
        drafts = [[t] for t in tokens.tolist()]
        last_pos = [last_rows[r.request_id][1] for r in requests]
        self._chain(requests, last_pos, tokens, hidden, drafts)
        return {req.request_id: d for req, d in zip(requests, drafts)}

    def _chain(self, requests: list[ScheduledRequest], last_pos: list[int], tokens: torch.Tensor,
               hidden: torch.Tensor, drafts: list[list[int]]) -> None:
        """Drafts 2..k: each guess goes back in with the head's own hidden state at the position after it."""
        bs = self.block_size
        active = list(range(len(requests)))
        for i in range(1, self.k):
            keep = [j for j in active if last_pos[j] + i < self.max_model_len]
            if not keep:
                return
            if keep != active:
                index = torch.tensor([active.index(j) for j in keep], device=self.device)
                tokens, hidden = tokens[index], hidden[index]
                active = keep
            pos = np.array([last_pos[j] + i for j in active], dtype=np.int64)
            block_ids = [requests[j].block_ids for j in active]
            slots = np.array([b[p // bs] * bs + p % bs for b, p in zip(block_ids, pos)], dtype=np.int64)
            # One token per request; the metadata builder takes decodes shortest first.
            order = np.argsort(pos, kind="stable")
            if (order != np.arange(len(order))).any():
                index = torch.from_numpy(order).to(self.device)
                tokens, hidden = tokens[index], hidden[index]
                active = [active[o] for o in order]
                pos, slots, block_ids = pos[order], slots[order], [block_ids[o] for o in order]
            meta = self.metadata_builder.build(CommonAttentionMetadata(
                query_lens=[1] * len(active), context_lens=pos.tolist(), block_ids=block_ids,
                num_decodes=len(active), slot_mapping=slots, block_size=bs))
            hidden = self.model(tokens, async_tensor_h2d(torch.from_numpy(pos), torch.long, self.device), hidden,
                                self.kv_caches, meta)
            tokens = self.model.compute_logits(hidden).argmax(dim=-1)
            for j, token in zip(active, tokens.tolist()):
                drafts[j].append(token)
