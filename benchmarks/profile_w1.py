"""Where W1's time goes in pagedllm: matmuls, attention, sampler, and the Python around them.

Runs W1 (32 prompts of 32-256 random ids, 64 greedy output tokens) under torch.profiler and
groups the CPU time of the torch operators into categories; what the engine spends outside
any operator (scheduling, input preparation, detokenisation, Python) is the remainder.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import random_requests

RESULTS = Path(__file__).resolve().parent / "results"
CATEGORIES = {
    "matmul (linear layers, LM head)": ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul",
                                        "mkldnn::_linear_pointwise", "onednn::qlinear_pointwise"),
    "int8 (de)quantisation around the matmuls": ("pagedllm_cpu::quantize_per_token",
                                                 "pagedllm_cpu::dequantize_int8_output"),
    "attention (SDPA, CPU paged-decode kernel)": ("scaled_dot_product", "pagedllm_cpu::paged_decode"),
    "CPU kernels: RMSNorm, SiLU, rotary": ("pagedllm_cpu::",),
    "KV gather / write": ("aten::index_select", "aten::index_copy_", "aten::index"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantization", default=None, choices=["int8"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16"])
    args = p.parse_args()
    llm = LLM(max_model_len=512, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.llm_engine
    vocab = engine.config.model_config.vocab_size
    reqs = random_requests(32, (32, 256), (64, 64), vocab, seed=0,
                           avoid_ids=frozenset(llm.get_tokenizer().all_special_ids))
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    sampler = engine.model_runner.sampler
    original = sampler.__call__

    sampler_time = [0.0]

    def traced_sampler(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            sampler_time[0] += time.perf_counter() - t

    engine.model_runner.sampler = traced_sampler
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params, use_tqdm=False)
    wall = time.perf_counter() - start
    engine.model_runner.sampler = sampler
    totals: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        name = evt.key
        for category, prefixes in CATEGORIES.items():
            if any(name.startswith(p) or p in name for p in prefixes) and name not in ("aten::linear", "aten::matmul"):
                totals[category] += evt.self_cpu_time_total / 1e6
                break
        else:
            if name.startswith("aten::"):
                totals["other torch ops (norms, rotary, activations, copies)"] += evt.self_cpu_time_total / 1e6
    # The sampler runs no matmul (the LM head is counted above): its ops sit in "other".
    other = "other torch ops (norms, rotary, activations, copies)"
    totals["sampler (penalties, top-k/p, argmax, logprobs)"] = sampler_time[0]
    totals[other] = max(0.0, totals[other] - sampler_time[0])
    accounted = sum(v for k, v in totals.items())
    totals["Python and engine overhead (remainder)"] = max(0.0, wall - accounted)
    print(f"W1 wall time under the profiler: {wall:.2f} s")
    print("top operators by self CPU time:")
    for evt in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"    {evt.key:<53}{evt.self_cpu_time_total / 1e6:8.2f} s  {evt.count:7d} calls")
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<55}{v:8.2f} s {100 * v / wall:6.1f}%")
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile_w1-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    out.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "wall_s": wall,
                               "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
                               "seconds": totals}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
