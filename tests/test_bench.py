"""The bench tools' arithmetic, checked against hand-made streams (not their speed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pagedllm.benchmarks.datasets import parse_range, random_requests
from pagedllm.benchmarks.stats import RequestRecord, percentile, serve_report, summarize


@pytest.mark.parametrize("q", [0, 10, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    assert math.isclose(percentile(values, q), float(np.percentile(values, q)))


def test_summarize_mean_and_median():
    stats = summarize([1.0, 2.0, 3.0, 10.0])
    assert stats["mean"] == 4.0 and stats["median"] == 2.5 and math.isclose(stats["p99"], 9.79)


def test_serve_report_from_a_synthetic_stream():
    # Request A: starts at 0, chunks at 0.5, 0.6, 0.8 (3 tokens); B: starts at 1, chunks at 1.2, 1.3 (2 tokens).
    a = RequestRecord(start=0.0, chunk_times=[0.5, 0.6, 0.8], output_tokens=3, prompt_tokens=10)
    b = RequestRecord(start=1.0, chunk_times=[1.2, 1.3], output_tokens=2, prompt_tokens=6)
    failed = RequestRecord(start=0.1, success=False, error="HTTP 400")
    report = serve_report([a, b, failed], duration=2.0)
    assert report["completed"] == 2 and report["failed"] == 1
    assert report["total_output_tokens"] == 5 and report["total_input_tokens"] == 16
    assert math.isclose(report["output_throughput"], 2.5)
    assert math.isclose(report["total_token_throughput"], 10.5)
    assert math.isclose(report["mean_ttft_ms"], (500 + 200) / 2)
    assert math.isclose(report["mean_e2el_ms"], (800 + 300) / 2)
    # TPOT: A (0.8-0.5)/2 = 0.15 s, B (0.3-0.2)/1 = 0.1 s
    assert math.isclose(report["mean_tpot_ms"], 125)
    # ITLs: 0.1, 0.2 (A) and 0.1 (B)
    assert math.isclose(report["mean_itl_ms"], 400 / 3)
    assert math.isclose(report["median_itl_ms"], 100)


def test_random_requests_are_reproducible_and_in_range():
    reqs = random_requests(50, (32, 256), (8, 16), vocab_size=5000, seed=3, avoid_ids=frozenset({1234}))
    again = random_requests(50, (32, 256), (8, 16), vocab_size=5000, seed=3, avoid_ids=frozenset({1234}))
    assert reqs == again
    assert all(32 <= len(r.prompt_token_ids) <= 256 and 8 <= r.output_len <= 16 for r in reqs)
    assert all(1000 <= t < 5000 and t != 1234 for r in reqs for t in r.prompt_token_ids)
    assert len({len(r.prompt_token_ids) for r in reqs}) > 10  # lengths really vary


def test_parse_range():
    assert parse_range("64") == (64, 64) and parse_range("32-256") == (32, 256) and parse_range("1:2") == (1, 2)
    with pytest.raises(ValueError):
        random_requests(1, (10, 5), (1, 1), vocab_size=100)


def test_bench_throughput_counts_tokens(llama_dir, tmp_path):
    from pagedllm.entrypoints.cli.main import main

    out = tmp_path / "tp.json"
    rc = main(["bench", "throughput", "--model", llama_dir, "--max-model-len", "128", "--num-prompts", "5",
               "--input-len", "4-12", "--output-len", "3", "--output-json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["num_prompts"] == 5 and result["total_output_tokens"] == 15
    assert 20 <= result["total_input_tokens"] <= 60
    assert math.isclose(result["output_tokens_per_s"], 15 / result["elapsed_s"])
