"""Engine metrics: the counters and gauges `LLM.get_metrics()` returns, and the periodic stats line.

Names follow vLLM's (`vllm:num_requests_running` becomes `pagedllm:num_requests_running`),
so dashboards and scripts carry over; the same objects will feed the server's /metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagedllm.core.scheduler import SchedulerStats
from pagedllm.logger import init_logger

logger = init_logger(__name__)

PREFIX = "pagedllm:"


@dataclass
class Metric:
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Counter(Metric):
    """Monotonic since the engine started."""


@dataclass
class Gauge(Metric):
    """A current level."""


@dataclass
class EngineCounters:
    prompt_tokens: int = 0  # prompt tokens of admitted requests (cache hits included)
    generation_tokens: int = 0
    requests_finished: int = 0
    num_steps: int = 0  # engine steps run (each one model forward pass)


class StatLogger:
    """Logs one line of throughput and cache state every `interval` seconds while busy."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last_time = time.monotonic()
        self._last_prompt = 0
        self._last_generation = 0
        self._last_queries = 0
        self._last_hits = 0

    def maybe_log(self, stats: SchedulerStats, counters: EngineCounters, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._last_time
        if elapsed < self.interval and not force:
            return
        queries = stats.prefix_cache_queries - self._last_queries
        hits = stats.prefix_cache_hits - self._last_hits
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            (counters.prompt_tokens - self._last_prompt) / max(elapsed, 1e-9),
            (counters.generation_tokens - self._last_generation) / max(elapsed, 1e-9),
            stats.num_running,
            stats.num_waiting,
            stats.kv_cache_usage * 100,
            100.0 * hits / queries if queries else 0.0,
        )
        self._last_time = now
        self._last_prompt, self._last_generation = counters.prompt_tokens, counters.generation_tokens
        self._last_queries, self._last_hits = stats.prefix_cache_queries, stats.prefix_cache_hits


def collect_metrics(stats: SchedulerStats, counters: EngineCounters) -> list[Metric]:
    return [
        Gauge(PREFIX + "num_requests_running", stats.num_running),
        Gauge(PREFIX + "num_requests_waiting", stats.num_waiting),
        Gauge(PREFIX + "kv_cache_usage_perc", stats.kv_cache_usage),
        Counter(PREFIX + "num_preemptions", stats.num_preemptions),
        Counter(PREFIX + "prefix_cache_queries", stats.prefix_cache_queries),
        Counter(PREFIX + "prefix_cache_hits", stats.prefix_cache_hits),
        Counter(PREFIX + "prompt_tokens", counters.prompt_tokens),
        Counter(PREFIX + "generation_tokens", counters.generation_tokens),
        Counter(PREFIX + "request_success", counters.requests_finished),
    ]
