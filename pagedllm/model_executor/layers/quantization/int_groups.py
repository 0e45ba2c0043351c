"""The form every integer checkpoint format (GPTQ, AWQ, compressed-tensors) unpacks into.

Its own module so that both the packed-integer methods (`packed_int.py`) and the CPU blocks they may be
re-expressed in (`int4_blocks.py`) can read it without importing each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class IntGroups(NamedTuple):
    """A layer's weight in the form every format reads into: w[n, k] = scales[g[k], n] * (q[k, n] - zeros[g[k], n])."""

    q: torch.Tensor  # [in, out] unsigned integers
    zeros: torch.Tensor  # [groups, out] integers
    scales: torch.Tensor  # [groups, out]
    g: torch.Tensor  # [in] each input's group (row of zeros and scales)

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] matrix."""
        g = self.g.long()
        if g.numel() and (g.min() < 0 or g.max() >= self.scales.shape[0]):
            raise ValueError(f"the group index holds groups outside 0..{self.scales.shape[0] - 1}")
        return ((self.q - self.zeros[g]).float() * self.scales.float()[g]).t().contiguous()
