"""The batched LoRA computation: every token of a step through its own adapter, in one shrink and one
expand per layer (Punica's idea, as vLLM's `PunicaWrapper`).

Each LoRA layer holds its adapters stacked in `max_loras` slots:
- `lora_a` [slots, S*R, in]: each slot's A of each of the layer's S slices (q, k, v; or gate, up)
  one under the other, R = max_lora_rank, zero past an adapter's own rank;
- `lora_b` [out, slots, R]: each slot's B (the scaling folded in); output row n belongs to one slice
  (`slices`: each slice's (offset, size) in the output) and reads that slice's R ranks of the shrink.
The step's `indices` [tokens] say which slot each row uses (-1: the base model).

Three implementations of `y += B[i] A[i] x` for row x with slot i:
- `add_lora_reference`: gathers each row's A and B and multiplies; the definition, for tests;
- `add_lora_dense` (CPU): every row against every slot's A in one matmul, the other slots' results
  zeroed by a one-hot mask, then one matmul per slice by all slots' B. The slots cost `max_loras`
  times the small rank-R work, but they are a few large dense matmuls (oneDNN), with no Python loop
  over requests and no gather of weights;
- `add_lora_triton` (GPU, `lora/ops/triton_punica.py`): a shrink and an expand kernel that read
  each row's slot and only that slot's weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pagedllm.lora.ops.layout import Slices, row_slices


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       indices: torch.Tensor, slices: Slices) -> torch.Tensor:
    """y + B[i] A[i] x per row, by gathering each row's weights (rows with i = -1 unchanged)."""
    rank = lora_b.shape[2]
    active = indices >= 0
    slot = indices.clamp(min=0)
    h = torch.bmm(lora_a[slot], x.unsqueeze(-1).to(lora_a.dtype)).view(len(x), len(slices), rank)  # shrink
    b = lora_b.permute(1, 0, 2)[slot]  # [T, out, R]
    delta = (b * h[:, row_slices(slices, x.device)]).sum(-1) * active.unsqueeze(-1)  # expand
    return y + delta.to(y.dtype)


def add_lora_dense(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   indices: torch.Tensor, slices: Slices, one_hot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same sum as dense matmuls over all slots, added into `y` in place (returned). `one_hot`
    [T, slots, 1, 1] may be precomputed once per step (`PunicaWrapper`)."""
    num_slots, _, in_features = lora_a.shape
    rank = lora_b.shape[2]
    if one_hot is None:
        one_hot = slot_mask(indices, num_slots, lora_a.dtype)
    h = F.linear(x.to(lora_a.dtype), lora_a.view(-1, in_features))  # shrink: [T, slots * S * R]
    h = h.view(len(x), num_slots, len(slices), rank) * one_hot
    for i, (offset, size) in enumerate(slices):  # expand, one slice's rows at a time
        h_i = h[:, :, i].reshape(len(x), num_slots * rank)
        y[:, offset : offset + size].addmm_(h_i.to(y.dtype), lora_b[offset : offset + size].view(size, -1).t())
    return y


def slot_mask(indices: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, slots, 1, 1]: 1 at each row's slot, all zero for base-model rows (-1)."""
    return (indices.unsqueeze(-1) == torch.arange(num_slots, device=indices.device)).to(dtype)[:, :, None, None]


class PunicaWrapper:
    """The step's token -> slot mapping, shared by every LoRA layer of one model.

    The model runner sets it before each forward pass (`update`); the layers' `LoRALinearMethod`
    reads it. The mapping lives here rather than in the model's arguments because it concerns only
    the linear layers, as the attention metadata concerns only attention (vLLM does the same).
    """

    def __init__(self, max_loras: int, device: torch.device) -> None:
        self.max_loras = max_loras
        self.device = device
        self.use_triton = device.type == "cuda"
        self.indices: Optional[torch.Tensor] = None  # None: no row of this step uses an adapter
        self._one_hot: Optional[torch.Tensor] = None

    def update(self, indices: Optional[torch.Tensor]) -> None:
        """`indices` [tokens] of slot numbers (-1: base), or None when every row is the base model's."""
        self.indices = indices
        self._one_hot = None

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 slices: Slices) -> torch.Tensor:
        """y plus each row's adapter term (`y` may be updated in place)."""
        indices = self.indices
        if indices is None:
            return y
        if self.use_triton:
            from pagedllm.lora.ops.triton_punica import add_lora_triton

            return add_lora_triton(y, x, lora_a, lora_b, indices, slices)
        if self._one_hot is None or self._one_hot.dtype != lora_a.dtype:
            self._one_hot = slot_mask(indices, lora_a.shape[0], lora_a.dtype)
        return add_lora_dense(y, x, lora_a, lora_b, indices, slices, self._one_hot)
