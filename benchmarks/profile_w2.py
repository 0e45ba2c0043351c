"""Where a batch-1 decode step's time goes (W2: one request, 128 prompt tokens, greedy decoding).

Runs the request once to warm up, then decodes `--output-len` tokens under torch.profiler and
splits the decode steps' time into: the weight matmuls (GGUF / int8 / oneDNN kernels), attention,
the other kernels between them, every other torch op (views, allocations, copies, the sampler's
ops), and the remainder, which no operator accounts for: Python in the model's forward, the
runner's input preparation, the scheduler, the detokeniser. Also counts the torch operators a
step dispatches, the figure the host overhead scales with. Prints a table, writes JSON under
benchmarks/results/.

    python benchmarks/profile_w2.py --quantization gguf --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

RESULTS = Path(__file__).resolve().parent / "results"
CATEGORIES = {
    # a GGUF model's decode-only step: every layer (matmuls, attention, norms) in one C++ op
    "all decoder layers in one op (gguf_decode_layers)": ("pagedllm_cpu::gguf_decode_layers",),
    "weight matmuls (linear layers, LM head)": ("pagedllm_cpu::gguf_linear", "pagedllm_cpu::gguf_gemm",
                                                "pagedllm_cpu::quantize_q8_blocks", "mkldnn::_linear_pointwise",
                                                "onednn::qlinear_pointwise", "pagedllm_cpu::quantize_per_token",
                                                "pagedllm_cpu::dequantize_int8_output", "aten::mm", "aten::addmm"),
    "attention (paged decode kernel)": ("pagedllm_cpu::paged_decode", "pagedllm_cpu::decode_attention",
                                        "scaled_dot_product"),
    "other CPU kernels (RMSNorm, SiLU, rotary)": ("pagedllm_cpu::",),
}
OTHER = "other torch ops (views, allocations, KV writes, sampler)"


def profiled(llm, prompt: list, params) -> tuple[dict[str, float], int, float]:
    """(seconds per category, operators dispatched, wall seconds) of one profiled generate call."""
    llm.reset_prefix_cache()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    ops = 0
    for evt in prof.key_averages():
        if not evt.key.startswith(("aten::", "pagedllm_cpu::", "mkldnn::", "onednn::")):
            continue
        ops += evt.count
        for category, prefixes in CATEGORIES.items():
            if any(evt.key.startswith(x) or x in evt.key for x in prefixes):
                totals[category] += evt.self_cpu_time_total / 1e6
                break
        else:
            totals[OTHER] += evt.self_cpu_time_total / 1e6
    return totals, ops, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF")
    p.add_argument("--quantization", default=None, choices=["int8", "gguf"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs, best taken")
    p.add_argument("--label", default=None, help="a name for this configuration in the JSON (e.g. 'before')")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import pagedllm
    from pagedllm import LLM, SamplingParams

    llm = LLM(model=args.model, max_model_len=512, quantization=args.quantization, disable_log_stats=True)
    prompt = [{"prompt_token_ids": list(range(1000, 1128))}]
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate(prompt, warm, use_tqdm=False)
    llm.reset_prefix_cache()
    # time the prefill alone, then the whole run: the difference is the decode steps. Best of
    # `--repeats`, in wall time and in this process's CPU time (with one thread, the CPU time is
    # much less sensitive to other jobs on the machine than the wall time).
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len + 1, ignore_eos=True)

    def timed(p: SamplingParams) -> tuple[float, float]:
        llm.reset_prefix_cache()
        wall, cpu = time.perf_counter(), time.process_time()
        llm.generate(prompt, p, use_tqdm=False)
        return time.perf_counter() - wall, time.process_time() - cpu

    pre_runs, full_runs = [], []
    for _ in range(args.repeats):
        pre_runs.append(timed(first))
        full_runs.append(timed(params))
    prefill_s = min(w for w, _ in pre_runs)
    step_ms = (min(w for w, _ in full_runs) - prefill_s) / args.output_len * 1e3
    step_cpu_ms = (min(c for _, c in full_runs) - min(c for _, c in pre_runs)) / args.output_len * 1e3
    # the decode steps' share: a profiled full run minus a profiled prefill-only run
    full, full_ops, full_wall = profiled(llm, prompt, params)
    pre, pre_ops, pre_wall = profiled(llm, prompt, first)
    totals = {k: full[k] - pre.get(k, 0.0) for k in full}
    wall = full_wall - pre_wall
    totals["Python and engine (remainder)"] = max(0.0, wall - sum(totals.values()))
    ops = full_ops - pre_ops
    steps = args.output_len
    print(f"W2 batch-1 decode, {args.quantization or 'float32'}, {args.threads} threads: "
          f"{step_ms:.1f} ms a decode step unprofiled ({1e3 / step_ms:.1f} tok/s; {step_cpu_ms:.1f} ms of CPU time), "
          f"prefill {prefill_s * 1e3:.0f} ms")
    print(f"under the profiler: {wall:.2f} s for {args.output_len} decode steps; "
          f"{ops / steps:.0f} torch operators a step")
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<58}{v / steps * 1e3:8.2f} ms/step {100 * v / wall:6.1f}%")
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    out = RESULTS / f"profile_w2-{args.quantization or 'float32'}{label}-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    out.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "label": args.label,
                               "quantization": args.quantization, "threads": args.threads,
                               "decode_step_ms": step_ms, "decode_step_cpu_ms": step_cpu_ms,
                               "load_average": os.getloadavg(), "pagedllm": pagedllm.__file__, "prefill_ms": prefill_s * 1e3,
                               "ops_per_step": ops / steps, "profiled_wall_s": wall,
                               "ms_per_step": {k: v / steps * 1e3 for k, v in totals.items()}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
