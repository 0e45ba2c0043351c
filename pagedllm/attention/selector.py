"""Picking the attention backend once, at start-up, from the device (or the environment).

`PAGEDLLM_ATTENTION_BACKEND` overrides the choice, as vLLM's `VLLM_ATTENTION_BACKEND` does:
`torch` (the reference, and the CPU default) or `triton` (the GPU default; on CPU it runs
under `TRITON_INTERPRET=1`, which is how CI tests the GPU kernels).
"""

from __future__ import annotations

import os

import torch

from pagedllm.attention.backend import AttentionBackend
from pagedllm.attention.torch_paged_attention import TorchPagedAttentionBackend

BACKEND_ENV = "PAGEDLLM_ATTENTION_BACKEND"


def get_attention_backend(device: torch.device) -> type[AttentionBackend]:
    name = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not name:
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        return TorchPagedAttentionBackend
    if name == "triton":
        try:
            from pagedllm.attention.triton_paged_attention import TritonPagedAttentionBackend
        except ImportError as e:
            raise ValueError(f"{BACKEND_ENV}=triton needs the triton package: {e}") from e
        return TritonPagedAttentionBackend
    raise ValueError(f"{BACKEND_ENV} must be 'torch' or 'triton', got {name!r}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
