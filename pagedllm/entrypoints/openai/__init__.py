"""The OpenAI-compatible server: `pagedllm serve` (see docs/serving.md)."""
