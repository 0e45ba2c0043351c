"""What GPTQ, AWQ and compressed-tensors checkpoints share: integer weights packed into int32, one
scale (and zero point) per group of input features, dequantized as w = scale * (q - zero).

The formats differ only in layout (which dimension is packed, in what order, where the zero points
sit and how they are offset), so each one is a `PackedIntLinearMethod` that says where its tensors
go (`create_weights`, with the layout attributes `layers/linear.py` slices by) and how to read them
back into a float matrix (`dequantize`, written out in plain PyTorch: the reference).

What a layer holds after loading (`form`, picked in `quantization/__init__.py` by device):
- "dequantized" (CPU, the default): the matrix dequantized once to the model dtype, multiplied as an
  unquantized layer is (oneDNN-packed where available): the checkpoint's 4-bit download and load,
  but a float model's memory and speed at run time;
- "blocks" (CPU with PAGEDLLM_CPU_INT4_BLOCKS=1): the integers re-expressed once in the GGUF kernel's
  blocks of 32 (`int4_blocks.py`), 4 bits a weight plus a float32 scale and min per block, multiplied
  by that kernel with activations of 15 bits per block of 32 in every layer (GGUF layers take q8
  outside QKV; these blocks are held to 1e-3 logprob of their float model), or whatever
  PAGEDLLM_GGUF_ACT_BITS says. A layer whose groups are not whole blocks of 32 is held "dequantized";
- "triton" (CUDA): the integers stay packed, a Triton kernel dequantizes tiles inside the matmul
  (`triton_int_matmul.py`);
- "packed": the checkpoint's tensors as loaded, dequantized on every call: the reference.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.logger import init_logger
from pagedllm.model_executor.layers.linear_method import UNQUANTIZED, LinearMethodBase
from pagedllm.model_executor.layers.quantization.gguf import Segment, activation_bits, gguf_linear
from pagedllm.model_executor.layers.quantization.int_groups import IntGroups

logger = init_logger(__name__)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """The unsigned `bits`-bit values packed into the int32 `packed` along `dim`, as int32.

    Value i of a word sits in bits [bits * i, bits * (i + 1)) and is element i of its pack of
    32 // bits, unless `order` is given: then value i is element `order[i]` (AWQ's interleave)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    words = packed.to(torch.int32).movedim(dim, -1)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., words, per_word] in bit order
    if order is not None:
        if sorted(order) != list(range(per_word)):
            raise ValueError(f"a packing order must be a permutation of 0..{per_word - 1}, got {list(order)}")
        values = values[..., torch.argsort(torch.tensor(order))]  # element j is value order.index(j)
    return values.flatten(-2).movedim(-1, dim)


def add_packed_parameter(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                         output_dim: int | None, input_dim: int | None, output_pack: int = 1,
                         input_pack: int = 1) -> None:
    """An empty parameter for a checkpoint tensor, and the layout the parallel layers slice it by
    (`layers/linear.py`: which dimensions hold output and input features, how many per element)."""
    layer.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
    if not hasattr(layer, "weight_layouts"):
        layer.weight_layouts = {}
    layer.weight_layouts[name] = dict(output_dim=output_dim, input_dim=input_dim, output_pack=output_pack,
                                      input_pack=input_pack)


def check_divisible(what: str, size: int, by: int, why: str) -> None:
    if size % by:
        raise ValueError(f"{what} ({size}) is not a multiple of {by} ({why})")


def full_input_size(layer: nn.Module, input_size: int) -> int:
    """The layer's whole input width: a row-parallel layer holds 1/tp of it (and says its total)."""
    return getattr(layer, "input_size", input_size)


def group_tables(layer_name: str, group_size: int, act_order: bool, input_size: int, full_input: int,
                 table_input_dim: int) -> tuple[int, int, int | None]:
    """How a layer's per-group tables (zero points, scales) are laid out on this rank: (the group size,
    their rows here, the tables' input dimension for the loaders to slice by, or None when every rank
    holds the whole table). `group_size` -1 is one group over the whole input; with act order split over
    ranks a rank's inputs may belong to any group, so it holds the whole table too."""
    group = group_size if group_size != -1 else full_input
    if group_size == -1 or (act_order and input_size != full_input):
        return group, full_input // group, None
    check_divisible(f"{layer_name} input size on this rank", input_size, group, "the group size")
    return group, input_size // group, table_input_dim


FORMS = {"dequantized": "dequantized at load", "triton": "kept packed, Triton kernel",
         "packed": "dequantized per call", "blocks": "kept in blocks of 32, CPU kernel"}


class PackedIntLinearMethod(LinearMethodBase):
    """A weight-only integer checkpoint's linear layer: the packed tensors load as they are stored,
    `unpack` reads them into `IntGroups`, and `form` says what is kept (module docstring).

    `dense`: the method a "dequantized" matrix is held and multiplied by (plain `F.linear`, or
    oneDNN-packed on CPU)."""

    format_name = ""  # "GPTQ", ... for the start-up log
    packed_names: tuple[str, ...] = ()  # the parameters `create_weights` makes
    bits = 4

    def __init__(self, dense: LinearMethodBase = UNQUANTIZED, form: str = "dequantized") -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
        self.dense = dense
        self.form = form
        self.description = f"{self.format_name}, {FORMS[form]}"
        self._fallback_reasons: set[str] = set()  # logged once each ("blocks" layers held dequantized)

    @abstractmethod
    def unpack(self, layer: nn.Module) -> IntGroups:
        """The layer's integers, zero points, scales and groups, read from its packed tensors."""

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The layer's float32 [output, input] weight."""
        return self.unpack(layer).dequantize()

    def layer_form(self, layer: nn.Module) -> str:
        """The form `layer` is held in: `form`, or "dequantized" where "blocks" could not hold it."""
        return "blocks" if hasattr(layer, "int_blocks") else ("dequantized" if self.form == "blocks" else self.form)

    def describe(self, layer: nn.Module) -> str:
        """The start-up log's words for `layer` (a method in "blocks" form may hold some layers dequantized)."""
        return f"{self.format_name}, {FORMS[self.layer_form(layer)]}"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.form == "packed":  # kept, as plain tensors: `weight_bytes` counts them, not as parameters
            for name in self.packed_names:
                if hasattr(layer, name):
                    tensor = getattr(layer, name).data
                    delattr(layer, name)
                    setattr(layer, name, tensor)
            return
        if self.form == "triton":
            from pagedllm.model_executor.layers.quantization.triton_int_matmul import IntGroupWeight

            layer.int_weight = IntGroupWeight.from_groups(*self.unpack(layer), self.bits, layer.model_dtype)
        elif self.form == "blocks":
            self._to_blocks(layer)
        if self.layer_form(layer) == "dequantized":
            weight = self.dequantize(layer).to(layer.model_dtype)
        for name in self.packed_names:
            if hasattr(layer, name):
                delattr(layer, name)
        if self.layer_form(layer) == "dequantized":
            layer.weight = nn.Parameter(weight, requires_grad=False)
            self.dense.process_weights_after_loading(layer)

    def _to_blocks(self, layer: nn.Module) -> None:
        """`layer.int_blocks` (and its kernel segment), or nothing where the blocks cannot hold the layer."""
        from pagedllm.model_executor.layers.quantization.int4_blocks import blocked_form  # it imports this module

        held = blocked_form(self.unpack(layer), self.bits)
        if isinstance(held, str):
            if held not in self._fallback_reasons:
                self._fallback_reasons.add(held)
                logger.info("%s layers with %s are held dequantized to float, not in the CPU kernel's blocks",
                            self.format_name, held)
            return
        layer.int_blocks = held
        layer.int_segments = [Segment(0, held.weight.shape[0], held.weight)]
        layer.int_act_bits = activation_bits(None)  # 15 bits for every kind, unless PAGEDLLM_GGUF_ACT_BITS

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        form = self.layer_form(layer)
        if form == "blocks":
            perm = layer.int_blocks.input_perm
            return gguf_linear(x if perm is None else x.index_select(-1, perm), layer.int_segments,
                               layer.int_segments[0].end, bias, layer.int_act_bits)
        if form == "dequantized":
            return self.dense.apply(layer, x, bias)
        if self.form == "triton":
            from pagedllm.model_executor.layers.quantization.triton_int_matmul import int_group_linear

            return int_group_linear(x, layer.int_weight, bias)
        return F.linear(x, self.dequantize(layer).to(x.dtype), bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        form = self.layer_form(layer)
        if form == "blocks":
            return layer.int_blocks.nbytes
        if form == "dequantized":
            return self.dense.weight_bytes(layer)
        if self.form == "triton":
            return layer.int_weight.nbytes
        tensors = [getattr(layer, name, None) for name in self.packed_names]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
