"""`pagedllm bench {throughput,latency,serve}`."""

from __future__ import annotations


def add_bench_parser(subparsers) -> None:
    from pagedllm.benchmarks.offline import add_latency_parser, add_throughput_parser
    from pagedllm.benchmarks.serve import add_serve_parser

    bench = subparsers.add_parser("bench", help="benchmark the engine or a server")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    add_throughput_parser(sub)
    add_latency_parser(sub)
    add_serve_parser(sub)
