"""N-gram (prompt lookup) proposals: the tokens that followed an earlier occurrence of the sequence's tail.

Text that repeats what came before (code being edited, a document being quoted) is predicted well by
its own history: if the last n tokens appeared earlier, what followed them then is a good guess for
what follows now. Like vLLM's `NgramProposer`, the longest tail between `prompt_lookup_min` and
`prompt_lookup_max` tokens that occurs earlier wins, and of its occurrences the earliest; up to
`num_speculative_tokens` tokens after it are proposed. No model runs, so a proposal is a point mass:
the rejection sampler accepts it with the target's probability of the token.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pagedllm.config import SpeculativeConfig
from pagedllm.logger import init_logger

logger = init_logger(__name__)


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self.k = config.num_speculative_tokens
        logger.info("Speculative decoding: n-gram drafts of up to %d tokens (prompt lookup, n-grams of %d to %d)",
                    self.k, self.min_n, self.max_n)

    def propose(self, token_ids: np.ndarray, k: int | None = None) -> list[int]:
        """Up to `k` (default `num_speculative_tokens`) draft tokens to follow `token_ids`; [] when the tail
        of no allowed length occurs earlier."""
        k = self.k if k is None else k
        num_tokens = len(token_ids)
        if k <= 0 or num_tokens <= self.min_n:
            return []
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            tail = token_ids[num_tokens - n:]
            # Windows starting at 0 .. num_tokens - n - 1: every earlier occurrence, not the tail itself.
            windows = sliding_window_view(token_ids[: num_tokens - 1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if len(hits):
                start = int(hits[0]) + n
                return token_ids[start : start + k].tolist()
        return []
