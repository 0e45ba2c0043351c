"""Linear layers split over a tensor-parallel group, as in Megatron-LM and vLLM.

A column-parallel layer holds a slice of the output features (no communication); a row-parallel
layer holds a slice of the input features and sums the partial products over the group (one
all-reduce). A transformer block pairs them — QKV then O, gate/up then down — so each block costs
two all-reduces. Every layer loads the full Hugging Face tensor and keeps its own slice
(`weight_loader`). With a group of one they are plain linear layers: one matmul, nothing else.

Which matmul, and in what form the weight is held, is the layer's `LinearMethod`, given when it is
built (`layers/linear_method.py`): `F.linear` on the weight as loaded, oneDNN's on a packed weight,
or int8. The layer slices, the method multiplies.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from pagedllm.distributed.parallel_state import TensorParallelGroup
from pagedllm.model_executor.layers.linear_method import UNQUANTIZED, LinearMethodBase

ShardId = Union[str, int, None]


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a loaded tensor (or its slice) into a parameter, refusing a wrong shape."""
    if dst.shape != src.shape:
        raise ValueError(f"has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def _check_full(loaded: torch.Tensor, dim: int, full_size: int) -> None:
    if loaded.dim() <= dim or loaded.shape[dim] != full_size:
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {full_size} along dimension {dim}")


# Where a parameter's output and input features lie. A plain weight is [output, input], one feature
# per element; a quantized checkpoint's tensors are laid out otherwise (GPTQ's qweight is [input / 8,
# output], eight int4 values to an int32), so its linear method records, per parameter name, in the
# layer's `weight_layouts` (on the layer: building on the meta device replaces the parameter objects):
#   output_dim / input_dim: the dimension indexed by output / input features (None: not split by
#     them, the same tensor for every shard and rank, e.g. an act-order g_idx in a column-parallel layer);
#   output_pack / input_pack: features per element along it (8 for int4 packed into int32, the
#     group size for a per-group scale table).
def _layout(layer: nn.Module, param: torch.Tensor) -> dict:
    layouts = getattr(layer, "weight_layouts", None)
    if not layouts:
        return {}
    return next((layouts.get(name, {}) for name, p in layer.named_parameters(recurse=False) if p is param), {})


def _output_layout(layer: nn.Module, param: torch.Tensor) -> tuple[int | None, int]:
    layout = _layout(layer, param)
    return layout.get("output_dim", 0), layout.get("output_pack", 1)


def _input_layout(layer: nn.Module, param: torch.Tensor) -> tuple[int | None, int]:
    layout = _layout(layer, param)
    return layout.get("input_dim", 1 if param.dim() > 1 else None), layout.get("input_pack", 1)


def _narrow(tensor: torch.Tensor, dim: int, pack: int, start: int, size: int) -> torch.Tensor:
    """Features [start, start + size) of `tensor` along `dim`, which holds `pack` features per element."""
    if start % pack or size % pack:
        raise ValueError(f"cannot be split at features {start}..{start + size}: its dimension {dim} holds "
                         f"{pack} features per element")
    return tensor.narrow(dim, start // pack, size // pack)


def _copy_shared(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """A tensor every fused shard carries a copy of (GPTQ's act-order g_idx: q, k and v share their
    input, so their quantizer's permutation): the first copy loads, the others must equal it."""
    if getattr(param, "shared_loaded", False):
        if param.shape != loaded.shape or not torch.equal(param, loaded.to(param.dtype)):
            raise ValueError("differs from the one the other projections fused into this layer loaded; a fused "
                             "layer holds one")
        return
    copy_weight(param, loaded)
    param.shared_loaded = True


class LinearBase(nn.Module):
    """This rank's [output, input] share of a linear layer; `linear_method` holds and applies it."""

    # what the layer is in the model, for a method that treats kinds differently (the GGUF kernels
    # quantise a QKV projection's input to 15 bits and the others' to 8: quantization/gguf.py)
    kind = "linear"

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_group: Optional[TensorParallelGroup],
                 linear_method: LinearMethodBase | None = None) -> None:
        super().__init__()
        self.tp_group = tp_group or TensorParallelGroup()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.world_size
        self.linear_method = linear_method or UNQUANTIZED
        self.linear_method.create_weights(self, input_size, output_size)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """y = x A^T with A split by rows (output features): rank r computes its slice of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_group: Optional[TensorParallelGroup] = None, linear_method: LinearMethodBase | None = None) -> None:
        tp_size = (tp_group or TensorParallelGroup()).world_size
        super().__init__(input_size, output_size // tp_size, bias, tp_group, linear_method)
        self.output_size = output_size

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        dim, pack = _output_layout(self, param)
        if dim is None:
            return _copy_shared(param, loaded)
        size = self.output_size // self.tp_size
        _check_full(loaded, dim, self.output_size // pack)
        copy_weight(param, _narrow(loaded, dim, pack, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices in one (gate and up): each rank holds its slice of each."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_group: Optional[TensorParallelGroup] = None, linear_method: LinearMethodBase | None = None) -> None:
        super().__init__(input_size, sum(output_sizes), bias, tp_group, linear_method)
        self.output_sizes = output_sizes

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        dim, pack = _output_layout(self, param)
        if dim is None:
            return _copy_shared(param, loaded)
        if shard_id is None:  # already fused: each part is sliced on its own
            _check_full(loaded, dim, self.output_size // pack)
            for i, part in enumerate(loaded.split([size // pack for size in self.output_sizes], dim=dim)):
                self.weight_loader(param, part, i)
            return
        local = [size // self.tp_size for size in self.output_sizes]
        _check_full(loaded, dim, self.output_sizes[shard_id] // pack)
        dst = _narrow(param, dim, pack, sum(local[:shard_id]), local[shard_id])
        copy_weight(dst, _narrow(loaded, dim, pack, self.tp_rank * local[shard_id], local[shard_id]))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V in one matrix, split by heads: rank r holds its query heads and their KV heads."""

    kind = "qkv"

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, tp_group: Optional[TensorParallelGroup] = None,
                 linear_method: LinearMethodBase | None = None) -> None:
        tp_size = (tp_group or TensorParallelGroup()).world_size
        self.head_size = head_size
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = total_num_kv_heads // tp_size
        super().__init__(hidden_size, (total_num_heads + 2 * total_num_kv_heads) * head_size, bias, tp_group,
                         linear_method)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        dim, pack = _output_layout(self, param)
        if dim is None:
            return _copy_shared(param, loaded)
        if shard_id is None:  # already fused: each of q, k, v is sliced on its own
            _check_full(loaded, dim, self.output_size // pack)
            sizes = [q * self.tp_size // pack, kv * self.tp_size // pack, kv * self.tp_size // pack]
            for name, part in zip("qkv", loaded.split(sizes, dim=dim)):
                self.weight_loader(param, part, name)
            return
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        _check_full(loaded, dim, size * self.tp_size // pack)
        copy_weight(_narrow(param, dim, pack, offset, size), _narrow(loaded, dim, pack, self.tp_rank * size, size))


class RowParallelLinear(LinearBase):
    """y = x A^T with A split by columns (input features): partial sums, all-reduced; bias once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_group: Optional[TensorParallelGroup] = None, linear_method: LinearMethodBase | None = None) -> None:
        tp_size = (tp_group or TensorParallelGroup()).world_size
        self.input_size = input_size  # set first: a quantized method sizes its scale tables from it
        super().__init__(input_size // tp_size, output_size, bias, tp_group, linear_method)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        dim, pack = _input_layout(self, param)
        if dim is None:  # the bias (whole on every rank, added after the sum), or a table every rank needs
            return copy_weight(param, loaded)
        size = self.input_size // self.tp_size
        _check_full(loaded, dim, self.input_size // pack)
        copy_weight(param, _narrow(loaded, dim, pack, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.linear_method.apply(self, x, self.bias)
        out = self.tp_group.all_reduce(self.linear_method.apply(self, x, None))
        return out if self.bias is None else out + self.bias


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank, no communication: a MoE router, whose logits every rank needs."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 linear_method: LinearMethodBase | None = None) -> None:
        super().__init__(input_size, output_size, bias, None, linear_method)
