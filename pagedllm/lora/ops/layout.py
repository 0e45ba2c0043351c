"""The stacked LoRA layout's one shared helper: which slice of a fused layer each output row belongs to.

Used by the PyTorch paths (`lora/punica.py`) and the Triton kernels (`lora/ops/triton_punica.py`) alike.
"""

from __future__ import annotations

from typing import Sequence

import torch

Slices = Sequence[tuple[int, int]]  # (output offset, output size) of each slice of a layer


def row_slices(slices: Slices, device: torch.device) -> torch.Tensor:
    """[out]: the slice each output row belongs to."""
    sizes = torch.tensor([size for _, size in slices], device=device)
    return torch.repeat_interleave(torch.arange(len(slices), device=device), sizes)
