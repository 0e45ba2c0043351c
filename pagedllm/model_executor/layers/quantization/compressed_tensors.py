"""compressed-tensors checkpoints in `pack-quantized` format (`quantization="compressed-tensors"`), as
llm-compressor writes them: int4 or int8 weight-only, per group or per channel (W4A16, W8A16).

Per linear layer of `in` inputs and `out` outputs, signed values q in [-2^(b-1), 2^(b-1)) stored
offset by 2^(b-1) and packed 32 // b to an int32 along the input, value i of a word in bits b*i..:
- `weight_packed` [out, in / pack];
- `weight_scale` [out, groups];
- `weight_zero_point` [out / pack, groups] (asymmetric only), packed along the output, same offset;
- `weight_g_idx` [in] (act order, `actorder: "group"`) the group of each input, else k // group_size;
- `weight_shape` [2]: the unpacked shape, which the layer already knows (skipped when loading).
w[n, k] = weight_scale[n, g] * (q[n, k] - zero_point[n, g]), g the group of input k.
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


@dataclass(frozen=True)
class CompressedTensorsConfig:
    bits: int
    group_size: int  # -1: per channel
    symmetric: bool
    actorder: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"compressed-tensors weights with num_bits={self.bits} are not supported; "
                             "supported: [4, 8]")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % (32 // self.bits)):
            raise ValueError(f"compressed-tensors group_size must be a positive multiple of {32 // self.bits}, "
                             f"got {self.group_size}")

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CompressedTensorsConfig":
        """The one weight-only int scheme of `config_groups` that every decoder linear layer has."""
        groups = list((config.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise ValueError(f"compressed-tensors checkpoints with {len(groups)} config groups are not supported "
                             "(one scheme for every linear layer is)")
        scheme = groups[0]
        fmt = scheme.get("format") or config.get("format")
        if fmt != "pack-quantized":
            raise ValueError(f"compressed-tensors format {fmt!r} is not supported; supported: ['pack-quantized']")
        if "Linear" not in (scheme.get("targets") or []):
            raise ValueError(f"compressed-tensors targets {scheme.get('targets')} are not supported (['Linear'] is)")
        if scheme.get("input_activations") or scheme.get("output_activations"):
            raise ValueError("compressed-tensors activation quantization is not supported (weight-only is)")
        ignored = [m for m in config.get("ignore") or [] if m != "lm_head"]
        if ignored:
            raise ValueError(f"compressed-tensors checkpoints that leave other modules than lm_head unquantized "
                             f"(ignore={ignored}) are not supported")
        weights = scheme.get("weights") or {}
        if weights.get("type", "int") != "int" or weights.get("dynamic"):
            raise ValueError(f"compressed-tensors weights of type {weights.get('type')!r} (dynamic="
                             f"{weights.get('dynamic')}) are not supported; static int is")
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise ValueError(f"compressed-tensors strategy {strategy!r} is not supported; supported: "
                             "['group', 'channel']")
        actorder = weights.get("actorder")
        if actorder not in (None, "group", "weight", False):
            raise ValueError(f"compressed-tensors actorder {actorder!r} is not supported")
        return cls(bits=int(weights.get("num_bits", 0)),
                   group_size=int(weights["group_size"]) if strategy == "group" else -1,
                   symmetric=bool(weights.get("symmetric", True)), actorder=actorder == "group")

    def linear_method(self, dense: LinearMethodBase = UNQUANTIZED,
                      form: str = "dequantized") -> "CompressedTensorsLinearMethod":
        return CompressedTensorsLinearMethod(self, dense, form)


class CompressedTensorsLinearMethod(PackedIntLinearMethod):
    packed_names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")

    def __init__(self, config: CompressedTensorsConfig, dense: LinearMethodBase = UNQUANTIZED,
                 form: str = "dequantized") -> None:
        self.config = config
        self.bits = config.bits
        self.format_name = f"compressed-tensors int{config.bits}"
        super().__init__(dense, form)

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        cfg, pack = self.config, self.config.pack
        full_in = full_input_size(layer, input_size)
        check_divisible("a compressed-tensors layer's input size on this rank", input_size, pack,
                        f"{pack} values per int32")
        group, rows, table_input_dim = group_tables("a compressed-tensors layer's", cfg.group_size, cfg.actorder,
                                                    input_size, full_in, 1)
        layer.model_dtype = torch.get_default_dtype()
        add_packed_parameter(layer, "weight_packed", (output_size, input_size // pack), torch.int32, output_dim=0,
                             input_dim=1, input_pack=pack)
        add_packed_parameter(layer, "weight_scale", (output_size, rows), layer.model_dtype, output_dim=0,
                             input_dim=table_input_dim, input_pack=group)
        if not cfg.symmetric:
            check_divisible("a compressed-tensors layer's output size on this rank", output_size, pack,
                            f"{pack} zero points per int32")
            add_packed_parameter(layer, "weight_zero_point", (output_size // pack, rows), torch.int32, output_dim=0,
                                 input_dim=table_input_dim, output_pack=pack, input_pack=group)
        if cfg.actorder:
            add_packed_parameter(layer, "weight_g_idx", (input_size,), torch.int32, output_dim=None, input_dim=0)
        layer.group_size = group

    def unpack(self, layer: nn.Module) -> IntGroups:
        """In the unsigned form the others share: q and the zero points as stored (both offset by
        2^(bits-1), which cancels in q - zero), the midpoint as zero when symmetric."""
        bits = self.config.bits
        q = unpack_int32(layer.weight_packed, bits, dim=1).t()  # [in, out]
        if self.config.actorder:
            g = layer.weight_g_idx.long()
        else:
            g = torch.arange(q.shape[0], device=q.device) // layer.group_size
        scales = layer.weight_scale.t()  # [groups, out]
        if self.config.symmetric:
            zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32, device=q.device)
        else:
            zeros = unpack_int32(layer.weight_zero_point, bits, dim=0).t()
        return IntGroups(q, zeros, scales, g)
