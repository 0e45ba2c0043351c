"""GPTQ checkpoints (`quantization="gptq"`): AutoGPTQ's / GPTQModel's int4 (or int8) group-quantized weights.

Per linear layer of `in` inputs and `out` outputs, with `bits`-bit values packed 32 // bits to an int32:
- `qweight` [in / pack, out]: the values packed along the input; value i of word [r, n] is q[r * pack + i, n];
- `qzeros` [groups, out / pack]: the zero points packed along the output the same way;
- `scales` [groups, out]: w[n, k] = scales[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k];
- `g_idx` [in]: the group of each input feature: k // group_size, unless the checkpoint was quantized
  in act order (`desc_act`), which visits the inputs by decreasing Hessian diagonal and so gives
  each group scattered inputs.
The original GPTQ format (`checkpoint_format` "gptq", "v1") stores each zero point minus one, so a
reader adds one back (a zero point of 0 therefore cannot be stored; GPTQModel's "gptq_v2" stores
them as they are). Symmetric checkpoints store the midpoint 2^(bits-1) as every zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedllm.model_executor.layers.linear_method import UNQUANTIZED, LinearMethodBase
from pagedllm.model_executor.layers.quantization.packed_int import (
    IntGroups,
    PackedIntLinearMethod,
    add_packed_parameter,
    check_divisible,
    full_input_size,
    group_tables,
    unpack_int32,
)

GPTQ_BITS = (4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: one group over the whole input (per output channel)
    desc_act: bool
    sym: bool
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        if self.bits not in GPTQ_BITS:
            raise ValueError(f"GPTQ checkpoints with bits={self.bits} are not supported; supported: {list(GPTQ_BITS)}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % (32 // self.bits)):
            raise ValueError(f"GPTQ group_size must be -1 or a positive multiple of {32 // self.bits}, "
                             f"got {self.group_size}")
        if self.checkpoint_format not in GPTQ_FORMATS:
            raise ValueError(f"GPTQ checkpoint_format {self.checkpoint_format!r} is not supported; supported: "
                             f"{list(GPTQ_FORMATS)} (repacked formats such as 'marlin' are not)")

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        missing = [key for key in ("bits", "group_size") if key not in config]
        if missing:
            raise ValueError(f"the GPTQ quantization config has no {missing[0]!r}")
        if config.get("lm_head"):
            raise ValueError("GPTQ checkpoints with a quantized LM head (lm_head=true) are not supported")
        if config.get("dynamic"):
            raise ValueError("GPTQModel's per-module 'dynamic' overrides are not supported")
        fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
        return cls(bits=int(config["bits"]), group_size=int(config["group_size"]),
                   desc_act=bool(config.get("desc_act", False)), sym=bool(config.get("sym", True)),
                   checkpoint_format=str(fmt).lower())

    def linear_method(self, dense: LinearMethodBase = UNQUANTIZED, form: str = "dequantized") -> "GPTQLinearMethod":
        return GPTQLinearMethod(self, dense, form)


class GPTQLinearMethod(PackedIntLinearMethod):
    format_name = "GPTQ"
    packed_names = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, config: GPTQConfig, dense: LinearMethodBase = UNQUANTIZED,
                 form: str = "dequantized") -> None:
        self.config = config
        self.bits = config.bits
        self.format_name = f"GPTQ int{config.bits}"
        super().__init__(dense, form)

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        cfg, pack = self.config, self.config.pack
        full_in = full_input_size(layer, input_size)
        check_divisible("a GPTQ layer's input size on this rank", input_size, pack, f"{pack} values per int32")
        check_divisible("a GPTQ layer's output size on this rank", output_size, pack,
                        f"{pack} zero points per int32")
        # With the whole table on every rank, a rank's g_idx slice indexes into it.
        group, rows, table_input_dim = group_tables("a GPTQ layer's", cfg.group_size, cfg.desc_act, input_size,
                                                    full_in, 0)
        layer.model_dtype = torch.get_default_dtype()
        add_packed_parameter(layer, "qweight", (input_size // pack, output_size), torch.int32, output_dim=1,
                             input_dim=0, input_pack=pack)
        add_packed_parameter(layer, "qzeros", (rows, output_size // pack), torch.int32, output_dim=1,
                             input_dim=table_input_dim, output_pack=pack, input_pack=group)
        add_packed_parameter(layer, "scales", (rows, output_size), layer.model_dtype, output_dim=1,
                             input_dim=table_input_dim, input_pack=group)
        add_packed_parameter(layer, "g_idx", (input_size,), torch.int32, output_dim=None, input_dim=0)
        layer.group_size = group

    def group_index(self, layer: nn.Module) -> torch.Tensor:
        """Each of this rank's input features' row in its scale and zero tables."""
        if self.config.desc_act:
            return layer.g_idx.long()
        # g_idx is trivial without act order (and ignored, as vLLM does): k // group_size, counted
        # from this rank's first input when the tables are split with the inputs.
        num_inputs = layer.qweight.shape[0] * self.config.pack
        return torch.arange(num_inputs, device=layer.qweight.device) // layer.group_size

    def unpack(self, layer: nn.Module) -> IntGroups:
        bits = self.config.bits
        zeros = unpack_int32(layer.qzeros, bits, dim=1)  # [groups, out]
        if self.config.checkpoint_format == "gptq":
            zeros = zeros + 1  # v1 stores zero - 1
        return IntGroups(unpack_int32(layer.qweight, bits, dim=0), zeros, layer.scales, self.group_index(layer))
