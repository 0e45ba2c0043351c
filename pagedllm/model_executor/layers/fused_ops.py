"""The elementwise ops between the matmuls (RMSNorm + residual, SiLU-and-mul, rotary): eager,
compiled, or pagedllm's CPU kernels.

Eager, each is several ops and passes over memory (and, on a GPU, several kernel launches);
`torch.compile` (inductor) fuses each into one. The compiled variants are picked per call by the
number of rows: on CPU a compiled call costs ~20 µs more than the work of a decode batch, so only
big batches (prefills) take them; on a GPU every batch does. On CPU the C++ kernels of
`pagedllm.cpu_ops` (`CpuKernelOps`) do each op in one call and one pass at every batch size, and
are the default there. The eager functions are the reference: the compiled ones are the same
code, the kernels are tested against them.

Which `FusedOps` a model uses is chosen once from the device and the config (`fused_ops_for`) and
handed to every layer that needs one when the model is built (`layers/build_context.py`); a layer
built on its own gets the eager ops.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pagedllm import cpu_ops

# Below this many rows a compiled op is slower than the eager one on CPU (measured on 2 cores:
# 32 rows 0.02 ms eager vs 0.04 ms compiled; 4710 rows 2.2 ms vs 1.2 ms for RMSNorm + residual).
CPU_MIN_ROWS = 256


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32 like the Hugging Face reference, then cast back before the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual): the residual add fused in, as vLLM's layers do it."""
    x = x + residual
    return rms_norm(x, weight, eps), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for the packed [gate | up] output of the gate/up projection."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split (NeoX/HF) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class FusedOps:
    """The op set one model uses: eager, or compiled above `min_rows` rows."""

    def __init__(self, compiled: bool = False, min_rows: int = 0) -> None:
        self.compiled = compiled
        self.min_rows = min_rows
        self._compiled: dict[str, Callable] = {}

    def _pick(self, name: str, eager: Callable, rows: int) -> Callable:
        if not self.compiled or rows < self.min_rows:
            return eager
        fn = self._compiled.get(name)
        if fn is None:  # compiled on first use; dynamic so that every batch size shares one graph
            fn = self._compiled[name] = torch.compile(eager, dynamic=True)
        return fn

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._pick("rms_norm", rms_norm, x.shape[0])(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pick("add_rms_norm", add_rms_norm, x.shape[0])(x, residual, weight, eps)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._pick("silu_and_mul", silu_and_mul, x.shape[0])(x)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._pick("rotate", rotate, x.shape[0])(x, cos, sin)

    def rotates_in_kernel(self, rows: int) -> bool:
        """Whether `rotary` of this many rows is the C++ kernel (`cpu_ops.rotary_embedding`), the
        rotation an attention backend's fused path (`AttentionImpl.forward_qkv`) also does."""
        return False

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor,
               sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, heads, dim] and k [T, kv_heads, dim] by the table rows at `positions`."""
        cos = cos_table.index_select(0, positions).unsqueeze(1)
        sin = sin_table.index_select(0, positions).unsqueeze(1)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)


def _kernel_rows(x: torch.Tensor) -> bool:
    """Whether the CPU kernels take x: float32/bfloat16 [rows, hidden] with contiguous rows."""
    return x.dim() == 2 and x.stride(1) == 1 and x.dtype in cpu_ops.KERNEL_DTYPES and x.device.type == "cpu"


class CpuKernelOps(FusedOps):
    """The CPU kernels for every batch the compiled ops (if enabled) do not take; shapes the
    kernels do not cover (e.g. Qwen3's per-head norms on 3-D views) stay eager."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self._takes_compiled(x) or not _kernel_rows(x):
            return super().rms_norm(x, weight, eps)
        return cpu_ops.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self._takes_compiled(x) or not (_kernel_rows(x) and _kernel_rows(residual)):
            return super().add_rms_norm(x, residual, weight, eps)
        return cpu_ops.add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_compiled(x) or not _kernel_rows(x):
            return super().silu_and_mul(x)
        return cpu_ops.silu_and_mul(x)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor,
               sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._takes_compiled(q) or q.dtype not in cpu_ops.KERNEL_DTYPES or q.stride(2) != 1 or k.stride(2) != 1:
            return super().rotary(positions, q, k, cos_table, sin_table)
        return cpu_ops.rotary_embedding(positions, q, k, cos_table, sin_table)  # in place

    def rotates_in_kernel(self, rows: int) -> bool:
        return not (self.compiled and rows >= self.min_rows)

    def _takes_compiled(self, x: torch.Tensor) -> bool:
        return self.compiled and x.shape[0] >= self.min_rows


EAGER_OPS = FusedOps()


def fused_ops_for(device: torch.device, enabled: bool) -> FusedOps:
    """On CPU the kernels (below `CPU_MIN_ROWS` rows when `enabled` compiles the rest); elsewhere
    compiled when `enabled`, else eager."""
    if device.type == "cpu" and cpu_ops.cpu_kernels_available():
        return CpuKernelOps(compiled=enabled, min_rows=CPU_MIN_ROWS)
    if not enabled:
        return EAGER_OPS
    return FusedOps(compiled=True, min_rows=CPU_MIN_ROWS if device.type == "cpu" else 0)
