"""Shared by the peer runners: read the workload, time the run, write one result file.

Each runner is executed by `compare_cpu.py` in its own process (and for vLLM and llama.cpp,
its own virtual environment), so they import nothing from pagedllm.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", required=True, help="JSON: prompts (token ids) and output_len")
    p.add_argument("--model", required=True, help="model path (GGUF file or HF directory)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=0)
    # float32 is W1's precision; bfloat16 runs the torch engines on the CPU's bf16 units (AMX, AVX512-BF16).
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile-fused-ops", action="store_true", help="pagedllm only: torch.compile its elementwise ops")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16"],
                   help="pagedllm only: the KV cache's storage dtype")
    p.add_argument("--quantization", default=None, choices=["int8", "gguf"],
                   help="pagedllm only: LLM(quantization=...)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="llama.cpp only: the high-level API, one request after another, instead of all sequences batched")
    p.add_argument("--repeats", type=int, default=1,
                   help="time the run this many times and report the fastest (pagedllm's runner; the others run once)")
    p.add_argument("--tokens-out", default=None,
                   help="llama.cpp only: also write each request's output token ids here (JSON), to check modes against each other")
    return p.parse_args()


def load_workload(path: str) -> tuple[list[list[int]], int]:
    with open(path) as f:
        w = json.load(f)
    return w["prompts"], w["output_len"]


def timed_run(run: Callable[[], int], out: str, repeats: int = 1, before_each: Callable[[], None] | None = None,
              **extra) -> None:
    """Time `run` (which returns the number of output tokens) `repeats` times and write the fastest,
    with every time beside it: on a shared VM the fastest of a few is the steadiest figure.
    `before_each` puts the engine back in the same state (an empty prefix cache) before each run."""
    times, cpu = [], []
    for _ in range(max(1, repeats)):
        if before_each is not None:
            before_each()
        start, cpu_start = time.perf_counter(), time.process_time()
        output_tokens = run()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    # the process's CPU seconds too: on an oversubscribed machine wall time mostly measures the
    # others' load, CPU time (on one thread) the work done (with more threads it includes spinning)
    with open(out, "w") as f:
        json.dump({"elapsed_s": min(times), "elapsed_all_s": times, "cpu_s": min(cpu), "cpu_all_s": cpu,
                   "output_tokens": output_tokens, **extra}, f)
