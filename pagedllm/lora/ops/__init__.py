"""LoRA kernels: the batched shrink and expand for GPUs (Triton)."""
