"""Verification: which draft tokens the target model keeps, and the token that follows them.

A request with k drafts d_0..d_{k-1} has k + 1 sampled rows in the verification step: row i holds the
target's distribution p_i for position i given the sequence and d_0..d_{i-1}; row k is the bonus row
after every draft. Each row's distribution is the one plain sampling would use there
(`random_sampling_probs`: processors, penalties and min_tokens over the output so far plus the earlier
drafts, then temperature, min-p, top-k, top-p), which `expand_rows` arranges by giving each row its own
view of the request.

Greedy rows accept d_i when it is the argmax, and otherwise emit the argmax: the exact tokens of plain
greedy decoding. Random rows use rejection sampling against a point-mass proposal (n-gram drafts are
deterministic, q = delta(d_i)): accept d_i with probability min(1, p_i(d_i) / 1) = p_i(d_i); on rejection
draw from the normalised residual max(0, p_i - q), which is p_i with d_i removed. A token emitted at
position i is then d_i with probability p_i(d_i) and x != d_i with probability
(1 - p_i(d_i)) * p_i(x) / (1 - p_i(d_i)) = p_i(x): the target's own distribution, whatever was drafted.
The first rejected row ends the run; with none, the bonus row's sample follows, so every step emits
at least one token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sample.sampler import (apply_processors, apply_token_bitmask, gather_logprobs,
                                     random_sampling_probs)
from pagedllm.scheduler_output import ScheduledRequest

NO_DRAFT = -1  # the draft id of a bonus row, and of every row of a request without drafts


def expand_rows(requests: list[ScheduledRequest]) -> tuple[list[ScheduledRequest], list[int]]:
    """One entry per sampled row: a request with k drafts becomes k + 1 rows, row i seeing the drafts
    before it as output tokens (for penalties and min_tokens); and each row's draft token (`NO_DRAFT`
    on bonus rows)."""
    rows: list[ScheduledRequest] = []
    drafts: list[int] = []
    for req in requests:
        spec = req.spec_token_ids
        if not spec:
            rows.append(req)
            drafts.append(NO_DRAFT)
            continue
        for i in range(len(spec) + 1):
            rows.append(req if i == 0 else dataclasses.replace(req, output_token_ids=req.output_token_ids + spec[:i]))
            drafts.append(spec[i] if i < len(spec) else NO_DRAFT)
    return rows, drafts


@dataclass
class RejectionSamplerOutput:
    accepted: torch.Tensor  # [R] bool: the row's draft was kept (False on NO_DRAFT rows)
    # [R]: the token emitted at this row if the run ends here (a draft row's recovered token, a bonus row's sample)
    output_token_ids: torch.Tensor
    # [R, 1 + k], for the token each row stands for (its draft if accepted, else output_token_ids)
    logprob_token_ids: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None
    ranks: Optional[torch.Tensor] = None


class RejectionSampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # rows without their own seed draw from it

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata, draft_token_ids: torch.Tensor
                 ) -> RejectionSamplerOutput:
        logits = logits.float()
        if meta.grammar_bitmask is not None:
            logits = apply_token_bitmask(logits, meta.grammar_bitmask)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.max_num_logprobs is not None else None
        logits = apply_processors(logits, meta)
        has_draft = draft_token_ids >= 0
        drafts = draft_token_ids.clamp(min=0)
        greedy_tokens = logits.max(dim=-1).indices  # the first maximum, as the sampler's greedy rows
        accepted = has_draft & (greedy_tokens == drafts)
        tokens = greedy_tokens
        if not meta.all_greedy:
            probs = random_sampling_probs(logits, meta)
            uniform = torch.rand(probs.shape[0], device=probs.device, generator=self.generator)
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            for row, gen in meta.generators.items():
                uniform[row] = torch.rand((), device=probs.device, generator=gen)
                noise[row].exponential_(generator=gen)
            draft_probs = probs.gather(1, drafts[:, None]).squeeze(1)
            random_accepted = has_draft & (uniform < draft_probs)
            # The residual: the target's distribution with the rejected draft removed (unnormalised: the
            # exponential race samples in proportion either way).
            residual = probs.scatter(1, drafts[:, None], torch.where(has_draft, 0.0, draft_probs)[:, None])
            random_tokens = residual.div(noise).max(dim=-1).indices
            is_random = meta.temperature > 0
            accepted = torch.where(is_random, random_accepted, accepted)
            tokens = torch.where(is_random, random_tokens, tokens)
        out = RejectionSamplerOutput(accepted=accepted, output_token_ids=tokens)
        if raw_logprobs is not None:
            chosen = torch.where(accepted, drafts, tokens)
            out.logprob_token_ids, out.logprobs, out.ranks = gather_logprobs(raw_logprobs, chosen,
                                                                             meta.max_num_logprobs)
        return out


def accepted_runs(requests: list[ScheduledRequest], accepted: list[bool]) -> list[tuple[int, int]]:
    """Per request, (its first row, how many of its drafts were kept): the drafts up to the first rejected one."""
    runs = []
    row = 0
    for req in requests:
        k = len(req.spec_token_ids)
        num_accepted = 0
        while num_accepted < k and accepted[row + num_accepted]:
            num_accepted += 1
        runs.append((row, num_accepted))
        row += k + 1
    return runs
