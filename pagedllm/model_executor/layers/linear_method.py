"""`LinearMethod`: how a linear layer holds its weight and multiplies by it, chosen when it is built.

vLLM's `LinearMethodBase` idea, kept small. A parallel layer (`layers/linear.py`) decides *which
slice* of a checkpoint tensor it holds; its method decides *in what form* it holds it and which
kernel multiplies: `create_weights` makes the parameters the checkpoint loads into,
`process_weights_after_loading` turns them into the method's own form once every tensor is in
(a oneDNN-packed layout, int8 with scales, ...), `apply` computes `x W^T + b`. The model loader
calls `process_weights_after_loading` on every layer that has a method, without knowing what it
does, so a new weight form (quantized checkpoints, LoRA) is a new method, not a change to the
layers or the loader.

The methods (picked in `layers/quantization/__init__.py::get_linear_methods`):
- `UnquantizedLinearMethod` (here): the weight as loaded, `F.linear`; GPUs and the reference;
- `CpuPackedLinearMethod` (`layers/cpu_packed_linear.py`): oneDNN's blocked layout on CPU;
- `Int8LinearMethod` (`layers/quantization/int8.py`): W8A8 on CPU, `quantization="int8"`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethodBase(ABC):
    """One way of holding and applying a linear weight; one instance may serve many layers."""

    # Shown in the start-up log line, e.g. "packed for oneDNN" (None: nothing to report).
    description: str | None = None

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        """Register what the checkpoint loads into: by default one [output, input] matrix `weight`."""
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded tensors into this method's form (default: keep them as they are)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b, with W in whatever form this method keeps it."""

    def weight_bytes(self, layer: nn.Module) -> int:
        """The bytes this method holds for `layer`'s weight (for the start-up log)."""
        weight = getattr(layer, "weight", None)
        return 0 if weight is None else weight.numel() * weight.element_size()


class UnquantizedLinearMethod(LinearMethodBase):
    """The weight as loaded, multiplied by `F.linear`: the reference every other method is tested against."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


UNQUANTIZED = UnquantizedLinearMethod()
