"""`SamplingMetadata`: the batch's sampling parameters as tensors, one row per sampled request.

Built by the model runner each step from the scheduled requests. Fields a batch does not
use stay `None`, so the sampler skips that work entirely (most batches use no penalties,
biases or masks). Per-request values are gathered into host lists and each column goes to
the device once, through pinned memory (`async_tensor_h2d`): building the metadata while
the forward pass runs on the GPU never waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pagedllm.scheduler_output import ScheduledRequest
from pagedllm.utils import async_tensor_h2d


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B]; 0 marks a greedy row
    all_greedy: bool
    all_random: bool
    top_k: Optional[torch.Tensor]  # [B] int, vocab size where disabled
    top_p: Optional[torch.Tensor]  # [B]
    min_p: Optional[torch.Tensor]  # [B]
    generators: dict[int, torch.Generator]  # row -> per-request generator (seeded requests)
    # penalties
    presence_penalties: Optional[torch.Tensor]
    frequency_penalties: Optional[torch.Tensor]
    repetition_penalties: Optional[torch.Tensor]
    output_token_ids: Optional[torch.Tensor]  # [B, L] padded with vocab_size
    prompt_token_ids: Optional[torch.Tensor]  # [B, Lp] padded with vocab_size
    # additive / masking processors, as (rows, cols[, values])
    logit_bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    allowed_mask: Optional[torch.Tensor]  # [B, V] bool, True = allowed
    min_tokens_mask: Optional[tuple[torch.Tensor, torch.Tensor]]  # (rows, token ids) to forbid
    max_num_logprobs: Optional[int]
    # Structured outputs: int32 [B, ceil(V / 32)], bit t of row i allowing token t (all bits set on
    # unconstrained rows); applied before anything else, logprobs included, as vLLM does.
    grammar_bitmask: Optional[torch.Tensor] = None


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def build_sampling_metadata(
    requests: list[ScheduledRequest],
    generators: dict[str, torch.Generator],
    vocab_size: int,
    device: torch.device,
    grammar: Optional[tuple[np.ndarray, dict[str, int]]] = None,
) -> SamplingMetadata:
    """`grammar`: the step's grammar bitmask and each constrained request's row in it
    (`SchedulerOutput.grammar_bitmask`, `structured_output_request_ids`)."""
    params = [r.sampling_params for r in requests]
    num = len(params)
    temps = [0.0 if p.sampling_type_greedy else p.temperature for p in params]
    all_greedy = all(t == 0.0 for t in temps)

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:
        return async_tensor_h2d(values, dtype, device)

    top_k = top_p = min_p = None
    if any(p.top_k > 0 for p in params):
        top_k = column([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.long)
    if any(p.top_p < 1.0 for p in params):
        top_p = column([p.top_p for p in params], torch.float32)
    if any(p.min_p > 0.0 for p in params):
        min_p = column([p.min_p for p in params], torch.float32)

    presence = frequency = repetition = out_ids = prompt_ids = None
    if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
        presence = column([p.presence_penalty for p in params], torch.float32)
        frequency = column([p.frequency_penalty for p in params], torch.float32)
        repetition = column([p.repetition_penalty for p in params], torch.float32)
        out_ids = async_tensor_h2d(_pad([r.output_token_ids for r in requests], vocab_size), torch.long, device)
        prompt_ids = async_tensor_h2d(_pad([r.prompt_token_ids for r in requests], vocab_size), torch.long, device)

    logit_bias = None
    bias_entries = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
    if bias_entries:
        rows, cols, vals = zip(*bias_entries)
        logit_bias = (column(list(rows), torch.long), column(list(cols), torch.long), column(list(vals), torch.float32))

    allowed_mask = None
    if any(p.allowed_token_ids for p in params):
        allowed_mask = torch.ones(num, vocab_size, dtype=torch.bool)  # built on the host, copied once
        for i, p in enumerate(params):
            if p.allowed_token_ids:
                allowed_mask[i] = False
                allowed_mask[i, p.allowed_token_ids] = True
        allowed_mask = async_tensor_h2d(allowed_mask, torch.bool, device)

    min_tokens_mask = None
    forbid = [
        (i, t)
        for i, (r, p) in enumerate(zip(requests, params))
        if len(r.output_token_ids) < p.min_tokens
        for t in p.all_stop_token_ids
        if t < vocab_size
    ]
    if forbid:
        rows, cols = zip(*forbid)
        min_tokens_mask = (column(list(rows), torch.long), column(list(cols), torch.long))

    grammar_bitmask = None
    if grammar is not None and grammar[0] is not None:
        bitmask, rows_of = grammar
        picked = [rows_of.get(r.request_id, -1) for r in requests]
        if any(row >= 0 for row in picked):
            full = np.full((num, bitmask.shape[1]), -1, dtype=np.int32)  # -1: every bit set
            for i, row in enumerate(picked):
                if row >= 0:
                    full[i] = bitmask[row]
            grammar_bitmask = async_tensor_h2d(torch.from_numpy(full), torch.int32, device)

    logprob_counts = [vocab_size if p.logprobs == -1 else p.logprobs for p in params if p.logprobs is not None]
    return SamplingMetadata(
        temperature=column(temps, torch.float32),
        all_greedy=all_greedy,
        all_random=all(t > 0.0 for t in temps),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        generators={i: generators[r.request_id] for i, r in enumerate(requests) if r.request_id in generators},
        presence_penalties=presence,
        frequency_penalties=frequency,
        repetition_penalties=repetition,
        output_token_ids=out_ids,
        prompt_token_ids=prompt_ids,
        logit_bias=logit_bias,
        allowed_mask=allowed_mask,
        min_tokens_mask=min_tokens_mask,
        max_num_logprobs=max(logprob_counts) if logprob_counts else None,
        grammar_bitmask=grammar_bitmask,
    )
