"""The sampler: from a batch of logits to one token per row, plus the logprobs asked for.

Order, as in vLLM V1: a structured-output request's grammar bitmask masks its logits before anything
else (so its logprobs are those of the constrained distribution); logprobs are taken next; then allowed-token
masks, logit bias and min_tokens masks; then penalties; greedy rows take the argmax here;
the rest are divided by their temperature, filtered by min-p, top-k and top-p, and drawn
with the exponential-race trick (argmax of probs / Exp(1) noise), which lets seeded rows
draw their noise from their own generator while the batch stays vectorised.

Everything is batched tensor work on the logits' device: no host syncs and no per-row
loops, except one noise draw per seeded row (each seed is its own generator, as in vLLM).
The model runner reads the results back with one `.tolist()` per result tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from pagedllm.sample.metadata import SamplingMetadata


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B]
    # [B, 1 + k]: sampled token first, then the top-k by raw logprob
    logprob_token_ids: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None
    ranks: Optional[torch.Tensor] = None


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of a request with its own seed. torch's CPU generator keeps only the low 32 bits
    of a seed (seeds 1, 2**32 + 1 and 2**40 + 1 would draw the same numbers), so the 64-bit seed is
    hashed first: equal seeds still draw equal streams, and nearby or high-bit seeds do not collide."""
    digest = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little"))


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # for rows without their own seed

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        if meta.grammar_bitmask is not None:
            logits = apply_token_bitmask(logits, meta.grammar_bitmask)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.max_num_logprobs is not None else None
        logits = apply_processors(logits, meta)
        sampled = self._sample(logits, meta)
        out = SamplerOutput(sampled_token_ids=sampled)
        if raw_logprobs is not None:
            out.logprob_token_ids, out.logprobs, out.ranks = gather_logprobs(
                raw_logprobs, sampled, meta.max_num_logprobs
            )
        return out

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        # max(dim).indices is argmax (the first maximum on ties) at 2.5x argmax's speed on CPU.
        greedy = logits.max(dim=-1).indices
        if meta.all_greedy:
            return greedy
        probs = random_sampling_probs(logits, meta)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, gen in meta.generators.items():
            noise[row].exponential_(generator=gen)
        random = probs.div(noise).max(dim=-1).indices
        if meta.all_random:
            return random
        return torch.where(meta.temperature > 0, random, greedy)


def random_sampling_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The distribution a random row draws from: processed logits (`apply_processors`) over the
    temperature, filtered by min-p, top-k and top-p. Speculative decoding's rejection sampler reads the
    same one, so that what it keeps is distributed exactly as what this sampler draws."""
    temperature = torch.where(meta.temperature > 0, meta.temperature, 1.0)
    logits = logits / temperature[:, None]
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p)
    if meta.top_k is not None or meta.top_p is not None:
        logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    return torch.softmax(logits, dim=-1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf where the grammar forbids a token. `bitmask` is int32 [B, ceil(V / 32)] in xgrammar's
    layout: bit j of word w stands for token 32 * w + j."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).flatten(1)[:, : logits.shape[-1]].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def apply_processors(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.allowed_mask is not None:
        logits = logits.masked_fill(~meta.allowed_mask, float("-inf"))
    if meta.logit_bias is not None:
        rows, cols, vals = meta.logit_bias
        logits = logits.index_put((rows, cols), vals, accumulate=True)
    if meta.min_tokens_mask is not None:
        logits = logits.index_put(meta.min_tokens_mask, logits.new_full((), float("-inf")))
    if meta.repetition_penalties is not None:
        logits = apply_penalties(logits, meta)
    return logits


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids padded with `vocab_size` -> [B, vocab_size] occurrence counts."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (multiplicative, prompt and output), then frequency and presence (output only)."""
    vocab_size = logits.shape[-1]
    output_counts = _token_counts(meta.output_token_ids, vocab_size)
    seen = (_token_counts(meta.prompt_token_ids, vocab_size) > 0) | (output_counts > 0)
    rep = meta.repetition_penalties[:, None].expand_as(logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - meta.frequency_penalties[:, None] * output_counts
    logits = logits - meta.presence_penalties[:, None] * (output_counts > 0).to(logits.dtype)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """Keep the k best tokens, then the smallest set whose probability reaches top_p.

    The token whose probability makes the running sum cross top_p is kept, and so is
    always the best token.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k.clamp(1, logits.shape[-1]) - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen token's logprob and rank, followed by the top-k tokens (ranks 1..k).

    rank = 1 + the number of tokens with a strictly larger logprob.
    """
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    if k > 0:
        top_vals, top_ids = logprobs.topk(k, dim=-1)
        top_ranks = torch.arange(1, k + 1, device=logprobs.device).expand(logprobs.shape[0], k)
        return (
            torch.cat([token_ids[:, None], top_ids], dim=1),
            torch.cat([chosen, top_vals], dim=1),
            torch.cat([ranks, top_ranks], dim=1),
        )
    return token_ids[:, None], chosen, ranks
