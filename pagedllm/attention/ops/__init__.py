"""Triton kernels behind `TritonPagedAttention`, one module per job.

- `reshape_and_cache`: scatter this step's K/V into the paged cache at their `slot_mapping` slots.
- `prefix_prefill`: causal attention for prompts and chunks, whose earlier tokens may already be
  cached (prefix caching, chunked prefill), reading every key through the block table.
- `paged_decode`: one query token per sequence against its whole cached context, the context split
  across programs when the batch alone cannot fill the GPU (flash-decoding / PagedAttention v2).

On CPU they run under `TRITON_INTERPRET=1` (set before triton is imported), which is how the tests
check them against the PyTorch reference.
"""

from pagedllm.attention.ops.paged_decode import paged_decode
from pagedllm.attention.ops.prefix_prefill import prefix_prefill
from pagedllm.attention.ops.reshape_and_cache import reshape_and_cache

__all__ = ["paged_decode", "prefix_prefill", "reshape_and_cache"]
