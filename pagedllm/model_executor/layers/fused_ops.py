"""The elementwise ops between the matmuls (RMSNorm + residual, SiLU-and-mul, rotary), eager or compiled.

Eager, each is several passes over memory (and, on a GPU, several kernel launches); `torch.compile`
(inductor) fuses each into one. The compiled variants are picked per call by the number of rows:
on CPU a compiled call costs ~20 µs more than the work of a decode batch, so only big batches
(prefills) take them; on a GPU every batch does. The eager functions are the reference: the
compiled ones are the same code.

Which `FusedOps` a model uses is set once, after it is built (`model_loader.load_model`), on every
module that declares a `fused_ops` attribute; the default is eager.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

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


EAGER_OPS = FusedOps()


def fused_ops_for(device: torch.device, enabled: bool) -> FusedOps:
    if not enabled:
        return EAGER_OPS
    return FusedOps(compiled=True, min_rows=CPU_MIN_ROWS if device.type == "cpu" else 0)
