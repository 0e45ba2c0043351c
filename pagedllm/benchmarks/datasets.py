"""Synthetic workloads: random token-id prompts with uniform lengths, as vLLM's random dataset."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def sample_lengths(rng: random.Random, low: int, high: int, num: int) -> list[int]:
    if low < 1 or high < low:
        raise ValueError(f"length range must satisfy 1 <= low <= high, got {low}..{high}")
    return [rng.randint(low, high) for _ in range(num)]


def random_requests(
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab_size: int,
    seed: int = 0,
    avoid_ids: frozenset[int] = frozenset(),
) -> list[BenchRequest]:
    """Prompts of random ids (special tokens avoided), lengths uniform in the given ranges."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    rng = random.Random(seed)
    in_lens = sample_lengths(rng, *input_len, num_prompts)
    out_lens = sample_lengths(rng, *output_len, num_prompts)
    # Stay clear of the low ids, where byte and special tokens usually live.
    low = min(1000, vocab_size // 4)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        ids = []
        while len(ids) < n_in:
            t = rng.randrange(low, vocab_size)
            if t not in avoid_ids:
                ids.append(t)
        requests.append(BenchRequest(ids, n_out))
    return requests


def parse_range(value: str) -> tuple[int, int]:
    """'128' -> (128, 128); '32-256' or '32:256' -> (32, 256)."""
    for sep in ("-", ":"):
        if sep in value:
            lo, hi = value.split(sep, 1)
            return int(lo), int(hi)
    return int(value), int(value)
