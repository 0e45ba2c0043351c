"""`GGUFLinearMethod`: a GGUF's quantised weights kept in their blocks (`quantization="gguf"`).

A decode step at batch 1 reads every weight once, so its speed is the bytes of weights read:
SmolLM2's Q4_1 file holds 5 bits a weight where the float32 model read 32 and int8 8. llama.cpp
keeps a GGUF's blocks as they are and multiplies by them; so does this method. Each layer's
tensors arrive undecoded (`gguf_loader.GGUFQuantizedTensor`, one per q/k/v or gate/up part),
are decoded into `BlockQuantizedWeight`s (`gguf_blocks.py`) and multiplied by the C++ kernel
(`cpu_ops.gguf_gemm`): activations quantised per block of 32, exact integer block sums, float
scales. The activations are quantised per layer kind (`activation_bits`): 15 bits where a QKV
projection reads them, llama.cpp's 8-bit q8_1 everywhere else. 15 bits cost two `vpdpbusd` per
weight byte where q8 costs one, and of SmolLM2's layer kinds q8 moves the model most in QKV, which
holds 16% of a layer's multiply-adds: on benchmarks/data/kjv_excerpt.txt (23,959 tokens) q8
everywhere costs +0.40% perplexity over float32, q8 everywhere but QKV +0.20%, and W1 runs 0.80x
`-q int8` with 15 bits everywhere, level with it this way (docs/performance.md, *Activation widths
per layer kind*). `PAGEDLLM_GGUF_ACT_BITS` (8 or 15) puts every layer at one width.

A fused layer may mix types (Q4_K_M files store some V and down projections as Q6_K): it is then
a few row *segments*, each with its own form, written into column slices of one output. Rows
of a type the kernel does not take (Q2_K, Q3_K, the IQ types...) are held dequantised to float32.

The embedding is kept in blocks too (a tied model's is also its LM head), and a lookup
dequantises just the rows asked for (`embedding`), so the float32 matrix (113 MB for SmolLM2,
544 MB for Qwen2.5-0.5B's untied one) is never made.

On CUDA the same blocks are moved to the device and multiplied by a Triton kernel that
dequantises them tile by tile, activations unquantised (`triton_gguf_matmul.py`; `runs_triton`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagedllm import cpu_ops
from pagedllm.logger import init_logger
from pagedllm.model_executor.gguf_loader import GGUFQuantizedTensor
from pagedllm.model_executor.layers.linear_method import LinearMethodBase
from pagedllm.model_executor.layers.quantization import gguf_blocks
from pagedllm.model_executor.layers.quantization.gguf_blocks import BlockQuantizedWeight

logger = init_logger(__name__)

GGUF_DTYPES = (torch.float32, torch.bfloat16)
GGUF_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the Triton kernel's
ACT_BITS_ENV = "PAGEDLLM_GGUF_ACT_BITS"
SENSITIVE_ACT_BITS = 15  # the inputs of the layers below
SENSITIVE_KINDS = ("qkv",)  # LinearBase.kind: whose q8 rounding moves the model's outputs most
DEFAULT_ACT_BITS = 8  # llama.cpp's q8_1, for every other layer


def activation_bits(kind: str | None = None) -> int:
    """Bits the GGUF kernels quantise a layer's activations to, read when the layer is built.

    `PAGEDLLM_GGUF_ACT_BITS` (8 or 15) sets every layer. Unset, a layer of a kind in
    `SENSITIVE_KINDS` takes 15 bits and any other kind 8; `kind=None` (a caller without a per-kind
    policy, such as the GPTQ/AWQ blocks, held to 1e-3 logprob of their float model) takes 15."""
    raw = os.environ.get(ACT_BITS_ENV, "").strip()
    if raw:
        if raw not in ("8", "15"):
            raise ValueError(f"{ACT_BITS_ENV} must be 8 or 15, not {raw!r}")
        return int(raw)
    if kind is None or kind in SENSITIVE_KINDS:
        return SENSITIVE_ACT_BITS
    return DEFAULT_ACT_BITS


def gguf_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `quantization="gguf"` cannot run here, or None when it can."""
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return "on CUDA its kernel is a Triton kernel, and triton is not installed"
        if dtype not in GGUF_CUDA_DTYPES:
            return f"on CUDA it takes a float32, bfloat16 or float16 model, not {str(dtype).removeprefix('torch.')}"
        return None
    if device.type != "cpu":
        return (f"its kernels run on CPU (C++) and CUDA (Triton), not on {device.type}; "
                "pass device='cpu' (--device cpu) or 'cuda'")
    if dtype not in GGUF_DTYPES:
        return f"it takes a float32 or bfloat16 model, not {str(dtype).removeprefix('torch.')}"
    return None


def runs_triton(device: torch.device) -> bool:
    """Whether layers for `device` take the Triton kernel (CUDA) rather than the C++ ones. (Tests
    set it to True to run the Triton path on CPU tensors under TRITON_INTERPRET=1.)"""
    return device.type == "cuda"


@dataclass
class Segment:
    """Output rows [start, end) of a layer, in one form: blocks for the kernel, or float32."""

    start: int
    end: int
    weight: BlockQuantizedWeight | torch.Tensor  # (the file's GGUFQuantizedTensor until after loading)

    @property
    def nbytes(self) -> int:
        w = self.weight
        return w.nbytes if isinstance(w, BlockQuantizedWeight) else w.numel() * w.element_size()


def _shard_rows(layer: nn.Module, shard: str | int | None, rows: int) -> int:
    """The first output row of a fused layer's part (q/k/v, gate/up) in this layer."""
    if shard is None:
        return 0
    if isinstance(shard, str):  # QKVParallelLinear
        q, kv = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
        return {"q": 0, "k": q, "v": q + kv}[shard]
    return sum(layer.output_sizes[:shard])  # MergedColumnParallelLinear


def _to_segment(start: int, loaded) -> Segment:
    if isinstance(loaded, torch.Tensor):
        return Segment(start, start + loaded.shape[0], loaded.detach().float().contiguous())
    weight = gguf_blocks.decode(loaded.raw, loaded.type_name)
    if weight is None:
        logger.debug("GGUF %s rows are held dequantised (no kernel for the type)", loaded.type_name)
        weight = loaded.dequantize(torch.float32)
    return Segment(start, start + loaded.shape[0], weight)


def _join_raw(segments: list[Segment]) -> list[Segment]:
    """Adjacent undecoded parts of one GGUF type (q, k and v; gate and up) become one tensor of
    rows of blocks, decoded once: joining the file's bytes is cheaper than joining the decoded
    forms (Qwen2.5-0.5B's load spent 5 s in `_merge`'s `torch.cat`)."""
    joined: list[Segment] = []
    for seg in sorted(segments, key=lambda s: s.start):
        prev = joined[-1] if joined else None
        if (prev is not None and prev.end == seg.start and isinstance(prev.weight, GGUFQuantizedTensor)
                and isinstance(seg.weight, GGUFQuantizedTensor) and prev.weight.type_name == seg.weight.type_name):
            a, b = prev.weight, seg.weight
            raw = np.concatenate([a.raw, b.raw])
            joined[-1] = Segment(prev.start, seg.end, GGUFQuantizedTensor(a.type_name, raw, (raw.shape[0], a.shape[1])))
        else:
            joined.append(seg)
    return joined


def _merge(segments: list[Segment]) -> list[Segment]:
    """Adjacent segments of the same form become one (one kernel call for q, k and v alike)."""
    merged: list[Segment] = []
    for seg in sorted(segments, key=lambda s: s.start):
        prev = merged[-1] if merged else None
        same_bits = (prev is not None and isinstance(prev.weight, BlockQuantizedWeight)
                     and isinstance(seg.weight, BlockQuantizedWeight) and prev.weight.bits == seg.weight.bits
                     and prev.weight.sub == seg.weight.sub)
        both_float = prev is not None and isinstance(prev.weight, torch.Tensor) and isinstance(seg.weight, torch.Tensor)
        if prev is not None and prev.end == seg.start and (same_bits or both_float):
            if both_float:
                weight = torch.cat([prev.weight, seg.weight])
            else:
                a, b = prev.weight, seg.weight
                weight = BlockQuantizedWeight(a.bits, torch.cat([a.qweight, b.qweight]),
                                              torch.cat([a.scales, b.scales]), torch.cat([a.mins, b.mins]))
            merged[-1] = Segment(prev.start, seg.end, weight)
        else:
            merged.append(seg)
    return merged


class GGUFLinearMethod(LinearMethodBase):
    """Holds a layer's weight as `layer.gguf_segments` (no `weight` parameter): the model's
    `load_weights` hands it each checkpoint part (`load_weight`), as vLLM's GGUF layers load
    their own `qweight`."""

    description = "kept in GGUF blocks"
    loads_weight = True

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self.triton = runs_triton(self.device)  # decided once, for every layer this method builds
        if self.triton:
            self.description = "kept in GGUF blocks, Triton kernel"  # the start-up log's words

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        tp_group = getattr(layer, "tp_group", None)
        if tp_group is not None and tp_group.world_size > 1:
            raise ValueError("quantization='gguf' does not split layers over tensor-parallel ranks yet; "
                             "use tensor_parallel_size=1 (or data parallelism)")
        layer.gguf_input_size, layer.gguf_output_size = input_size, output_size
        layer.gguf_segments = []
        layer.gguf_act_bits = activation_bits(getattr(layer, "kind", "linear"))

    def load_weight(self, layer: nn.Module, loaded, shard: str | int | None = None) -> None:
        rows, cols = tuple(loaded.shape)
        if cols != layer.gguf_input_size:
            raise ValueError(f"has shape {(rows, cols)}, expected {layer.gguf_input_size} columns")
        # kept as the file's bytes until every part is in (`_join_raw`)
        layer.gguf_segments.append(Segment(_shard_rows(layer, shard, rows), _shard_rows(layer, shard, rows) + rows,
                                           loaded))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.gguf_segments = _merge([_to_segment(seg.start, seg.weight) for seg in _join_raw(layer.gguf_segments)])
        covered = sum(s.end - s.start for s in layer.gguf_segments)
        if covered != layer.gguf_output_size or any(a.end != b.start for a, b in
                                                    zip(layer.gguf_segments, layer.gguf_segments[1:])):
            raise ValueError(f"checkpoint is missing weights: {covered} of {layer.gguf_output_size} output rows of a "
                             "GGUF layer were loaded")
        if self.triton:  # the blocks were decoded on the host
            from pagedllm.model_executor.layers.quantization.triton_gguf_matmul import segments_to

            segments_to(layer.gguf_segments, self.device)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.triton:
            from pagedllm.model_executor.layers.quantization.triton_gguf_matmul import triton_gguf_linear

            return triton_gguf_linear(x, layer.gguf_segments, layer.gguf_output_size, bias)
        return gguf_linear(x, layer.gguf_segments, layer.gguf_output_size, bias, layer.gguf_act_bits)

    def embedding(self, layer: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rows of a blocks-held embedding for `input_ids`, dequantised."""
        if self.triton:
            from pagedllm.model_executor.layers.quantization import triton_gguf_matmul

            return triton_gguf_matmul.embedding(layer.gguf_segments, input_ids, layer.gguf_input_size, dtype)
        flat = input_ids.reshape(-1)
        out = torch.empty(flat.shape[0], layer.gguf_input_size, dtype=dtype)
        for seg in layer.gguf_segments:
            inside = (flat >= seg.start) & (flat < seg.end)
            ids = flat[inside] - seg.start
            w = seg.weight
            if isinstance(w, BlockQuantizedWeight):
                rows = w.rows(ids).dequantize()
            else:
                rows = w[ids]
            out[inside] = rows.to(dtype)
        return out.reshape(*input_ids.shape, layer.gguf_input_size)

    def weight_bytes(self, layer: nn.Module) -> int:
        return sum(s.nbytes for s in layer.gguf_segments)


def gguf_linear(x: torch.Tensor, segments: list[Segment], out_features: int,
                bias: torch.Tensor | None, act_bits: int = 8) -> torch.Tensor:
    """x W^T + b over a layer's segments: activations quantised once (to `act_bits`, 8 or 15), each
    segment's product written into its columns of one float32 output. (8 unless asked: GGUF layers
    and the int4 blocks of packed_int.py pass `activation_bits()`, read when they were built.)"""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    kernels = cpu_ops.cpu_kernels_available()
    if kernels and len(segments) == 1 and isinstance(segments[0].weight, BlockQuantizedWeight):
        # the common case in one op (activation quantisation, output allocation and product)
        w = segments[0].weight
        bias = bias if bias is None or bias.dtype == torch.float32 else bias.float()
        out = torch.ops.pagedllm_cpu.gguf_linear(x2, w.qweight, w.scales, w.mins, bias, w.bits, act_bits)
        return (out if x.dtype == torch.float32 else out.to(x.dtype)).view(*shape[:-1], out_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
    activations = None
    for seg in segments:
        cols = out[:, seg.start:seg.end] if len(segments) > 1 else out
        seg_bias = None if bias is None else bias[seg.start:seg.end].float().contiguous()
        w = seg.weight
        if isinstance(w, torch.Tensor):
            torch.matmul(x2.float(), w.T, out=cols) if len(segments) == 1 else cols.copy_(x2.float() @ w.T)
            if seg_bias is not None:
                cols.add_(seg_bias)
        elif kernels:
            if activations is None:
                activations = cpu_ops.quantize_q8_blocks(x2, act_bits)
            cpu_ops.gguf_gemm_auto(cols, activations, w.qweight, w.scales, w.mins, seg_bias, w.bits)
        else:
            ref = gguf_blocks.block_linear_reference(x2, w, act_bits=act_bits)
            cols.copy_(ref if seg_bias is None else ref + seg_bias)
    out = out if x.dtype == torch.float32 else out.to(x.dtype)
    return out.reshape(*shape[:-1], out_features)


__all__ = ["GGUFLinearMethod", "gguf_linear", "gguf_unavailable_reason", "runs_triton"]
