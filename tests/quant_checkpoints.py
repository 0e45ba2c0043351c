"""Tiny GPTQ, AWQ and compressed-tensors checkpoints, written from the formats' specifications.

`write_quantized_checkpoint` takes a plain checkpoint (conftest's `build_checkpoint`), quantizes each
decoder linear weight to integers with one scale and zero point per group of inputs, packs them as
the format says, and writes beside it the *reference*: the same checkpoint with every quantized
weight replaced by its dequantized float32 value, scale * (q - zero). Loading the quantized
checkpoint must give that reference model.

The packing here is written out word by word with explicit bit positions (numpy, uint32) and
shares no code with the engine's unpacking (`layers/quantization/packed_int.py`):
- GPTQ: qweight [in / pack, out], value i of word [r, n] is q[r * pack + i, n] at bits bits*i;
  qzeros [groups, out / pack] the same along the output, stored minus one (v1, "gptq") or as they
  are ("gptq_v2"); scales [groups, out] float16; g_idx [in] int32, the group of each input.
- AWQ (GEMM): qweight [in, out / 8], value i of a word is output 8c + AWQ_ORDER[i]; qzeros likewise.
- compressed-tensors pack-quantized: signed q + 2^(bits-1), packed along the input (weight_packed
  [out, in / pack]); zero points (asymmetric) packed along the output ([out / pack, groups]).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the projections that read the same input, and so share GPTQ's act-order permutation
_INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
             "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


def pack_words(values: np.ndarray, bits: int, axis: int, order: list[int] | None = None) -> np.ndarray:
    """Pack unsigned `bits`-bit integers along `axis` into int32 words: word w holds, at bits
    [bits*i, bits*(i+1)), element w * per + order[i] (order defaults to 0, 1, 2, ...)."""
    per = 32 // bits
    order = order or list(range(per))
    v = np.moveaxis(values.astype(np.uint64), axis, -1)
    assert v.shape[-1] % per == 0 and v.min() >= 0 and v.max() < (1 << bits)
    words = np.zeros(v.shape[:-1] + (v.shape[-1] // per,), dtype=np.uint64)
    for i in range(per):
        words |= v[..., order[i]::per] << np.uint64(bits * i)
    return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis)


def quantize_groups(w: torch.Tensor, groups: torch.Tensor, num_groups: int, bits: int, sym: bool,
                    zero_range: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of w [out, in] per (output, group of inputs): unsigned q [out, in],
    float16-representable scales [out, groups] and integer zeros [out, groups] within `zero_range`."""
    top = (1 << bits) - 1
    out = w.shape[0]
    scales, zeros = torch.empty(out, num_groups), torch.empty(out, num_groups, dtype=torch.int64)
    for g in range(num_groups):
        cols = w[:, groups == g]
        if sym:
            scale = cols.abs().amax(1) / ((top + 1) // 2 - 1)
            zero = torch.full((out,), (top + 1) // 2, dtype=torch.int64)
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scale = (hi - lo) / top
            zero = torch.round(-lo / scale).long().clamp(*zero_range)
        scales[:, g] = scale.half().float()
        zeros[:, g] = zero
    q = torch.round(w / scales[:, groups]) + zeros[:, groups]
    return q.clamp(0, top).long(), scales, zeros


def write_quantized_checkpoint(src: str, dst: str, reference: str, fmt: str, *, bits: int = 4,
                               group_size: int = 16, sym: bool = True, desc_act: bool = False,
                               checkpoint_format: str = "gptq", config_in: str = "config.json",
                               seed: int = 0) -> None:
    """`fmt`: "gptq", "awq" or "compressed-tensors"; `desc_act`: GPTQ's act order (compressed-tensors'
    actorder "group"); `config_in`: "config.json" (quantization_config) or the older side file
    ("quantize_config.json" for GPTQ, "quant_config.json" for AWQ)."""
    for folder in (dst, reference):
        shutil.copytree(src, folder, dirs_exist_ok=True)
        for name in os.listdir(folder):
            if name.endswith(".safetensors") or name.endswith(".index.json"):
                os.remove(os.path.join(folder, name))
    state = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    perms: dict[tuple[str, str], torch.Tensor] = {}
    quantized, dequantized = {}, {}
    for name, w in state.items():
        parts = name.split(".")
        if len(parts) < 2 or parts[-1] != "weight" or parts[-2] not in PROJECTIONS:
            quantized[name] = dequantized[name] = w
            continue
        prefix, (out, k) = name[: -len(".weight")], w.shape
        groups_n = k // group_size
        if desc_act:  # GPTQ visits inputs in a permuted order; q/k/v (gate/up) share theirs
            key = (prefix.rsplit(".", 2)[0], _INPUT_OF[parts[-2]])
            perm = perms.setdefault(key, torch.randperm(k, generator=gen))
            groups = torch.empty(k, dtype=torch.int64)
            groups[perm] = torch.arange(k) // group_size
        else:
            groups = torch.arange(k) // group_size
        zero_range = (1, (1 << bits) - 1) if checkpoint_format == "gptq" and fmt == "gptq" else (0, (1 << bits) - 1)
        q, scales, zeros = quantize_groups(w.float(), groups, groups_n, bits, sym, zero_range)
        dequantized[name] = (scales[:, groups] * (q - zeros[:, groups])).float()
        if fmt == "gptq":
            stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
            quantized[prefix + ".qweight"] = torch.from_numpy(pack_words(q.T.numpy(), bits, axis=0))
            quantized[prefix + ".qzeros"] = torch.from_numpy(pack_words(stored_zeros.T.numpy(), bits, axis=1))
            quantized[prefix + ".scales"] = scales.T.contiguous().half()
            quantized[prefix + ".g_idx"] = groups.int()
            if prefix + ".bias" not in state:  # AutoGPTQ saves a bias for every layer, zero where it has none
                quantized[prefix + ".bias"] = torch.zeros(out, dtype=torch.float16)
        elif fmt == "awq":
            quantized[prefix + ".qweight"] = torch.from_numpy(pack_words(q.T.numpy(), 4, axis=1, order=AWQ_ORDER))
            quantized[prefix + ".qzeros"] = torch.from_numpy(pack_words(zeros.T.numpy(), 4, axis=1, order=AWQ_ORDER))
            quantized[prefix + ".scales"] = scales.T.contiguous().half()
        else:  # compressed-tensors: the signed values are q - 2^(bits-1), stored offset back to q
            quantized[prefix + ".weight_packed"] = torch.from_numpy(pack_words(q.numpy(), bits, axis=1))
            quantized[prefix + ".weight_scale"] = scales.half()
            quantized[prefix + ".weight_shape"] = torch.tensor([out, k])
            if not sym:
                quantized[prefix + ".weight_zero_point"] = torch.from_numpy(pack_words(zeros.numpy(), bits, axis=0))
            if desc_act:
                quantized[prefix + ".weight_g_idx"] = groups.int()
    save_file({n: t.contiguous() for n, t in quantized.items()}, os.path.join(dst, "model.safetensors"))
    save_file({n: t.contiguous() for n, t in dequantized.items()}, os.path.join(reference, "model.safetensors"))

    settings = quantization_config(fmt, bits, group_size, sym, desc_act, checkpoint_format)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    if config_in == "config.json":
        config["quantization_config"] = settings
    else:
        with open(os.path.join(dst, config_in), "w") as f:
            json.dump({k: v for k, v in settings.items() if k != "quant_method"}, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


def quantization_config(fmt: str, bits: int, group_size: int, sym: bool, desc_act: bool,
                        checkpoint_format: str = "gptq") -> dict:
    """config.json's `quantization_config` as each tool writes it."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                "checkpoint_format": checkpoint_format, "damp_percent": 0.01, "true_sequential": True}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": not sym,
                "version": "gemm", "modules_to_not_convert": None}
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group",
                        "group_size": group_size, "actorder": "group" if desc_act else None, "dynamic": False}}},
    }
