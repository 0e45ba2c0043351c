"""`GET /metrics`: Prometheus text with vLLM's metric names under the `pagedllm:` prefix.

Gauges and counters are read from the engine's latest `EngineStats` when Prometheus scrapes, named
by the engine's one metric table (`engine/metrics.py::ENGINE_METRICS`), one sample per data-parallel
replica under its `engine` label (vLLM's); the latency histograms
(time to first token, inter-token latency, end-to-end latency) are observed by the front end as
each request finishes. Everything lives in one registry per
server, so two servers in one process never mix their numbers.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedllm.engine.async_llm import AsyncLLM, RequestStats
from pagedllm.engine.metrics import ENGINE_METRICS, PREFIX, SPEC_DECODE_PER_POS

# vLLM's buckets (seconds), cut at what a CPU engine can take.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]
_TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class _EngineCollector(Collector):
    """The engine's gauges and counters, as of its last loop iteration."""

    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        # One sample per data-parallel replica, labelled `engine` as vLLM labels them.
        per_engine = list(enumerate(self.engine.get_engine_stats()))
        labels = ["model_name", "engine"]
        families = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
        for spec in ENGINE_METRICS:
            if spec.counted_by_server:
                continue  # observed per finish reason as requests end (ServerMetrics.record)
            family = families[spec.kind](PREFIX + spec.name, spec.help, labels=labels)
            for index, stats in per_engine:
                family.add_metric([self.model_name, str(index)], getattr(stats, spec.stat))
            yield family
        if any(stats.spec_decode_num_accepted_tokens_per_pos for _, stats in per_engine):
            per_pos = CounterMetricFamily(PREFIX + SPEC_DECODE_PER_POS.name, SPEC_DECODE_PER_POS.help,
                                          labels=labels + ["position"])
            for index, stats in per_engine:
                for pos, count in enumerate(stats.spec_decode_num_accepted_tokens_per_pos):
                    per_pos.add_metric([self.model_name, str(index), str(pos)], count)
            yield per_pos
        lora_stats = [stats for _, stats in per_engine if stats.max_lora]
        if lora_stats:  # vLLM's: the adapters with running and waiting requests, as labels; the value a time
            info = GaugeMetricFamily(PREFIX + "lora_requests_info", "Running stats on lora requests.",
                                     labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            running = sorted({name for stats in lora_stats for name in stats.running_lora_adapters})
            waiting = sorted({name for stats in lora_stats for name in stats.waiting_lora_adapters})
            info.add_metric([str(lora_stats[0].max_lora), ",".join(waiting), ",".join(running)],
                            max(stats.time for stats in lora_stats))
            yield info
        healthy = GaugeMetricFamily(PREFIX + "engine_healthy", "1 while the engine loop is running.",
                                    labels=["model_name"])
        healthy.add_metric([self.model_name], 0.0 if self.engine.is_dead else 1.0)
        yield healthy


class ServerMetrics:
    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine, model_name))
        self.model_name = model_name
        labels = ["model_name"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels, buckets=_ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.",
                             labels, buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.prompt_tokens = Histogram(PREFIX + "request_prompt_tokens", "Number of prefill tokens processed.",
                                       labels, buckets=_TOKEN_BUCKETS, registry=self.registry).labels(model_name)
        self.generation_tokens = Histogram(PREFIX + "request_generation_tokens",
                                           "Number of generation tokens processed.",
                                           labels, buckets=_TOKEN_BUCKETS, registry=self.registry).labels(model_name)
        success = next(spec for spec in ENGINE_METRICS if spec.name == "request_success")
        self.request_success = Counter(PREFIX + success.name, success.help, labels + ["finished_reason"],
                                       registry=self.registry)
        engine.stat_loggers.append(self.record)

    def record(self, stats: RequestStats) -> None:
        if stats.time_to_first_token is not None:
            self.ttft.observe(stats.time_to_first_token)
        for latency in stats.inter_token_latencies:
            self.itl.observe(latency)
        if stats.e2e_latency is not None:
            self.e2e.observe(stats.e2e_latency)
        self.prompt_tokens.observe(stats.num_prompt_tokens)
        self.generation_tokens.observe(stats.num_generation_tokens)
        self.request_success.labels(self.model_name, stats.finish_reason or "stop").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
