"""`pagedllm bench`: throughput, latency and serving benchmarks, with vLLM's bench options and figures."""
