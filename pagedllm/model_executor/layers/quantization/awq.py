"""AWQ checkpoints (`quantization="awq"`): AutoAWQ's int4 group-quantized weights, "GEMM" layout.

Per linear layer of `in` inputs and `out` outputs, eight int4 values to an int32, packed along the
*output* (unlike GPTQ) and interleaved: value i of a word (bits 4i..4i+3) is element `AWQ_PACK_ORDER[i]`
of its eight outputs, the order AWQ's GEMM kernel unpacks fastest.
- `qweight` [in, out / 8];
- `qzeros` [groups, out / 8], the same interleave, zero points stored as they are (0..15);
- `scales` [groups, out]: w[n, k] = scales[k // group_size, n] * (q[k, n] - zero[k // group_size, n]).
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

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_VERSIONS = ("gemm",)


@dataclass(frozen=True)
class AWQConfig:
    bits: int
    group_size: int  # -1: one group over the whole input
    zero_point: bool = True
    version: str = "gemm"

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"AWQ checkpoints with bits={self.bits} are not supported; supported: [4]")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"AWQ group_size must be -1 or a positive multiple of 8, got {self.group_size}")
        if not self.zero_point:
            raise ValueError("AWQ checkpoints without zero points (zero_point=false) are not supported")
        if self.version not in AWQ_VERSIONS:
            raise ValueError(f"AWQ version {self.version!r} is not supported; supported: {list(AWQ_VERSIONS)} "
                             "(GEMV and the repacked exllama/marlin layouts are not)")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AWQConfig":
        bits = config.get("bits", config.get("w_bit"))
        group_size = config.get("group_size", config.get("q_group_size"))
        if bits is None or group_size is None:
            raise ValueError("the AWQ quantization config needs 'bits' (or 'w_bit') and 'group_size' "
                             "(or 'q_group_size')")
        if config.get("lm_head"):
            raise ValueError("AWQ checkpoints with a quantized LM head (lm_head=true) are not supported")
        skipped = [m for m in config.get("modules_to_not_convert") or [] if m != "lm_head"]
        if skipped:
            raise ValueError(f"AWQ checkpoints that leave decoder modules unquantized (modules_to_not_convert="
                             f"{skipped}) are not supported")
        return cls(bits=int(bits), group_size=int(group_size), zero_point=bool(config.get("zero_point", True)),
                   version=str(config.get("version", "gemm")).lower())

    def linear_method(self, dense: LinearMethodBase = UNQUANTIZED, form: str = "dequantized") -> "AWQLinearMethod":
        return AWQLinearMethod(self, dense, form)


class AWQLinearMethod(PackedIntLinearMethod):
    format_name = "AWQ int4"
    packed_names = ("qweight", "qzeros", "scales")

    def __init__(self, config: AWQConfig, dense: LinearMethodBase = UNQUANTIZED,
                 form: str = "dequantized") -> None:
        self.config = config
        self.bits = config.bits
        super().__init__(dense, form)

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        full_in = full_input_size(layer, input_size)
        check_divisible("an AWQ layer's output size on this rank", output_size, 8, "8 values per int32")
        group, rows, table_input_dim = group_tables("an AWQ layer's", self.config.group_size, False, input_size,
                                                    full_in, 0)
        layer.model_dtype = torch.get_default_dtype()
        add_packed_parameter(layer, "qweight", (input_size, output_size // 8), torch.int32, output_dim=1, input_dim=0,
                             output_pack=8)
        add_packed_parameter(layer, "qzeros", (rows, output_size // 8), torch.int32, output_dim=1,
                             input_dim=table_input_dim, output_pack=8, input_pack=group)
        add_packed_parameter(layer, "scales", (rows, output_size), layer.model_dtype, output_dim=1,
                             input_dim=table_input_dim, input_pack=group)
        layer.group_size = group

    def unpack(self, layer: nn.Module) -> IntGroups:
        q = unpack_int32(layer.qweight, 4, dim=1, order=AWQ_PACK_ORDER)  # [in, out]
        zeros = unpack_int32(layer.qzeros, 4, dim=1, order=AWQ_PACK_ORDER)  # [groups, out]
        return IntGroups(q, zeros, layer.scales, torch.arange(q.shape[0], device=q.device) // layer.group_size)
