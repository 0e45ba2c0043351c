"""Fan-out of `n > 1`: one user request becomes n sequences, gathered back into one output.

Each child is an ordinary `Request` scheduled on its own; the prefix cache lets them share
the prompt's KV blocks. A seeded request gives child i the seed `seed + i`, so the n
completions differ yet are reproducible (as in vLLM).
"""

from __future__ import annotations

from pagedllm.sampling_params import SamplingParams


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{index}_{parent_id}"


def child_sampling_params(params: SamplingParams, index: int) -> SamplingParams:
    if params.n == 1:
        return params
    child = params.clone()
    child.n = 1
    if params.seed is not None:
        # seed + i, wrapped into int64 so that a seed near the top of the range stays a valid seed
        child.seed = (params.seed + index + 2**63) % 2**64 - 2**63
    if index > 0:
        child.prompt_logprobs = None  # computed once, by the first child
    return child
