"""The engine's numbers: one stats snapshot type, one table of metric names, the periodic stats line.

`EngineStats` is what the engine core reports after each step (the scheduler's gauges, the KV
cache, the token and step counters). Everything that shows engine numbers reads it: the stats
line in the log (`StatLogger`), `LLM.get_metrics()`, the server's `/metrics` (one sample per
data-parallel replica), and the engine-state view (`/v1/engine/state`: its `counters`, and its
`history`, a list of them). `ENGINE_METRICS` names them once, with vLLM's names under the
`pagedllm:` prefix (`vllm:num_requests_running` becomes `pagedllm:num_requests_running`), so
dashboards and scripts carry over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagedllm.logger import init_logger

logger = init_logger(__name__)

PREFIX = "pagedllm:"


@dataclass
class EngineStats:
    """The engine core's gauges and counters at one moment (counters are monotonic since start)."""

    time: float = 0.0  # time.time() when taken
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks held by requests
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # in tokens, as vLLM counts them
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0  # prompt tokens of admitted requests (cache hits included)
    generation_tokens: int = 0
    requests_finished: int = 0  # sequences that ended with a stop or at their length
    num_steps: int = 0  # engine steps run (each one model forward pass)
    # LoRA (vLLM's lora_requests_info): adapter name -> its running / waiting requests; max_lora 0: LoRA off
    running_lora_adapters: dict[str, int] = field(default_factory=dict)
    waiting_lora_adapters: dict[str, int] = field(default_factory=dict)
    max_lora: int = 0
    # Speculative decoding (vLLM's spec_decode_* counters; all 0 without a speculative_config)
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # after the `pagedllm:` prefix
    kind: str  # "gauge" or "counter"
    stat: str  # the EngineStats field
    help: str
    # The server counts this one itself, per finish reason, as requests end (vLLM's label).
    counted_by_server: bool = False


ENGINE_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("num_requests_running", "gauge", "num_running", "Number of requests in model execution batches."),
    MetricSpec("num_requests_waiting", "gauge", "num_waiting", "Number of requests waiting to be processed."),
    MetricSpec("kv_cache_usage_perc", "gauge", "kv_cache_usage", "KV-cache usage. 1 means 100 percent usage."),
    MetricSpec("num_preemptions", "counter", "num_preemptions", "Cumulative number of preemptions from the engine."),
    MetricSpec("prefix_cache_queries", "counter", "prefix_cache_queries",
               "Prefix-cache queries, in number of queried tokens."),
    MetricSpec("prefix_cache_hits", "counter", "prefix_cache_hits", "Prefix-cache hits, in number of cached tokens."),
    MetricSpec("prompt_tokens", "counter", "prompt_tokens", "Number of prefill tokens processed."),
    MetricSpec("generation_tokens", "counter", "generation_tokens", "Number of generation tokens processed."),
    MetricSpec("request_success", "counter", "requests_finished", "Count of successfully processed requests.",
               counted_by_server=True),
    MetricSpec("spec_decode_num_drafts", "counter", "spec_decode_num_drafts", "Number of spec decoding drafts."),
    MetricSpec("spec_decode_num_draft_tokens", "counter", "spec_decode_num_draft_tokens", "Number of draft tokens."),
    MetricSpec("spec_decode_num_accepted_tokens", "counter", "spec_decode_num_accepted_tokens",
               "Number of accepted tokens."),
)
# vLLM's per-position acceptance counter, one sample per draft position (label `position`).
SPEC_DECODE_PER_POS = MetricSpec("spec_decode_num_accepted_tokens_per_pos", "counter",
                                 "spec_decode_num_accepted_tokens_per_pos",
                                 "Accepted tokens per draft position.")


@dataclass
class Metric:
    """One value of `LLM.get_metrics()`."""

    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Counter(Metric):
    """Monotonic since the engine started."""


@dataclass
class Gauge(Metric):
    """A current level."""


def collect_metrics(stats: EngineStats) -> list[Metric]:
    """`ENGINE_METRICS` read off one snapshot, as `LLM.get_metrics()` returns them."""
    kinds = {"gauge": Gauge, "counter": Counter}
    metrics = [kinds[spec.kind](PREFIX + spec.name, getattr(stats, spec.stat)) for spec in ENGINE_METRICS]
    metrics += [Counter(PREFIX + SPEC_DECODE_PER_POS.name, count, {"position": str(pos)})
                for pos, count in enumerate(stats.spec_decode_num_accepted_tokens_per_pos)]
    return metrics


class StatLogger:
    """Logs one line of throughput and cache state every `interval` seconds while busy."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last = EngineStats(time=time.monotonic())

    def maybe_log(self, stats: EngineStats, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._last.time
        if elapsed < self.interval and not force:
            return
        last = self._last
        queries = stats.prefix_cache_queries - last.prefix_cache_queries
        hits = stats.prefix_cache_hits - last.prefix_cache_hits
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%%s",
            (stats.prompt_tokens - last.prompt_tokens) / max(elapsed, 1e-9),
            (stats.generation_tokens - last.generation_tokens) / max(elapsed, 1e-9),
            stats.num_running,
            stats.num_waiting,
            stats.kv_cache_usage * 100,
            100.0 * hits / queries if queries else 0.0,
            _spec_decode_summary(stats, last),
        )
        self._last = EngineStats(time=now, prompt_tokens=stats.prompt_tokens,
                                 generation_tokens=stats.generation_tokens,
                                 prefix_cache_queries=stats.prefix_cache_queries,
                                 prefix_cache_hits=stats.prefix_cache_hits,
                                 spec_decode_num_drafts=stats.spec_decode_num_drafts,
                                 spec_decode_num_draft_tokens=stats.spec_decode_num_draft_tokens,
                                 spec_decode_num_accepted_tokens=stats.spec_decode_num_accepted_tokens)


def _spec_decode_summary(stats: EngineStats, last: EngineStats) -> str:
    """', Spec decode acceptance: ...' over the interval, as vLLM logs it; '' when nothing was drafted."""
    drafts = stats.spec_decode_num_drafts - last.spec_decode_num_drafts
    draft_tokens = stats.spec_decode_num_draft_tokens - last.spec_decode_num_draft_tokens
    if not drafts:
        return ""
    accepted = stats.spec_decode_num_accepted_tokens - last.spec_decode_num_accepted_tokens
    return (f", Spec decode acceptance rate: {100.0 * accepted / draft_tokens:.1f}%, mean acceptance length: "
            f"{1 + accepted / drafts:.2f}")
