"""The arithmetic of benchmark reports: percentiles and per-request serving metrics.

Kept free of I/O so tests can check it against hand-made streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (NumPy's default method); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float], percentiles: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    out = {"mean": sum(values) / len(values) if values else math.nan, "median": percentile(values, 50)}
    out.update({f"p{p}": percentile(values, p) for p in percentiles})
    return out


@dataclass
class RequestRecord:
    """One streamed request as the client saw it (times in seconds since the benchmark began)."""

    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each chunk carrying text
    output_tokens: int = 0
    prompt_tokens: int = 0
    success: bool = True
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float:
        """Time per output token after the first (vLLM's definition)."""
        if self.output_tokens <= 1:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def serve_report(records: Sequence[RequestRecord], duration: float) -> dict:
    ok = [r for r in records if r.success and r.chunk_times]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [r.tpot for r in ok if not math.isnan(r.tpot)]
    report = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration else math.nan,
        "output_throughput": output_tokens / duration if duration else math.nan,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration if duration else math.nan,
    }
    for name, values in (
        ("ttft_ms", [r.ttft * 1e3 for r in ok]),
        ("tpot_ms", [t * 1e3 for t in tpots]),
        ("itl_ms", [x * 1e3 for r in ok for x in r.itls]),
        ("e2el_ms", [r.e2e * 1e3 for r in ok]),
    ):
        for stat, value in summarize(values).items():
            report[f"{stat}_{name}"] = value
    return report


def format_table(title: str, rows: Sequence[tuple[str, object]]) -> str:
    """A fixed-width two-column table, the way vLLM's bench tools print results."""
    width = max(len(k) for k, _ in rows) + 2
    line = "=" * (width + 16)
    out = [line, title.center(len(line)), line]
    for key, value in rows:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        out.append(f"{key:<{width}}{shown:>16}")
    out.append(line)
    return "\n".join(out)
