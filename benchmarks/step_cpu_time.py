"""CPU time of a batch-1 decode step (W2's request: 128 prompt tokens, greedy), split by layer of
the engine, on one thread, against llama.cpp's CPU time per token on the same file.

On a machine other jobs share, wall times swing by 2-10x; the CPU time one thread spends is
what a step costs, whatever else runs. Measured: the engine step ((generate 33 tokens - generate
1) / 32), the model runner's `execute_model`, the model's forward and its LM head on a captured
decode step, and, as the floor, the GGUF kernels of every linear layer called back to back.
Best of 3 for each. `--llamacpp-python` also times llama.cpp (its high-level API, one thread, the
same request) in a subprocess. Prints the figures, writes JSON under benchmarks/results/.

    PYTHONPATH=/path/to/checkout python benchmarks/step_cpu_time.py --label after \\
        --llamacpp-python /work/llamacpp-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = list(range(1000, 1128))
LLAMACPP = '''
import sys, time
import numpy as np
from llama_cpp import Llama, LogitsProcessorList
llm = Llama(model_path=sys.argv[1], n_ctx=1024, n_batch=512, n_threads=1, n_threads_batch=1, verbose=False)
eos = llm.token_eos()
def mask(ids, scores):
    scores[eos] = -np.inf
    return scores
def gen(n):
    llm.reset()
    start, k = time.process_time(), 0
    for _ in llm.generate(list(range(1000, 1128)), temp=0.0, top_k=1, reset=True,
                          logits_processor=LogitsProcessorList([mask])):
        k += 1
        if k >= n:
            break
    return time.process_time() - start
gen(8)
print((min(gen(65) for _ in range(3)) - min(gen(1) for _ in range(3))) / 64 * 1e3)
'''


def best_ms(fn, n: int = 60) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantization", default="gguf", choices=["gguf", "int8", "float32"])
    p.add_argument("--label", default=None, help="a name for this checkout in the JSON (e.g. 'before')")
    p.add_argument("--llamacpp-python", default=None, help="a Python with llama-cpp-python, to time llama.cpp too")
    args = p.parse_args()
    torch.set_num_threads(1)
    import pagedllm
    from pagedllm import LLM, SamplingParams

    llm = LLM(model=None, max_model_len=512, quantization=None if args.quantization == "float32" else args.quantization,
              disable_log_stats=True)
    runner = llm.llm_engine.model_runner
    captured, execute = [], runner.execute_model

    def capture(sched):
        if sched.scheduled and len(sched.scheduled[0].token_ids) == 1:
            captured.append(sched)
        return execute(sched)

    runner.execute_model = capture
    prompt = [{"prompt_token_ids": PROMPT}]
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    runner.execute_model = execute
    sched = captured[-1]

    def generate(n: int) -> float:
        llm.reset_prefix_cache()
        start = time.process_time()
        llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.process_time() - start

    ms = {"engine step": (min(generate(33) for _ in range(3)) - min(generate(1) for _ in range(3))) / 32 * 1e3}
    with torch.inference_mode():
        inputs = runner.prepare_inputs(sched)
        hidden = runner._forward(inputs, runner.kv_caches)
        ms["model runner (execute_model)"] = best_ms(lambda: runner.execute_model(sched))
        ms["model forward"] = best_ms(lambda: runner._forward(inputs, runner.kv_caches))
        ms["LM head"] = best_ms(lambda: runner.model.compute_logits(hidden[inputs.sample_rows]))
        if args.quantization == "gguf":
            op = torch.ops.pagedllm_cpu.gguf_linear
            weights = [(torch.randn(1, m.gguf_input_size), m.gguf_segments[0].weight, getattr(m, "gguf_act_bits", 8))
                       for m in runner.model.modules() if getattr(m, "gguf_segments", None)]

            def kernels() -> None:
                for x, w, act_bits in weights:
                    op(x, w.qweight, w.scales, w.mins, None, w.bits, act_bits)

            ms[f"the {len(weights)} GGUF linear kernels alone"] = best_ms(kernels)
    if args.llamacpp_python:
        model = runner.config.model_config.model
        out = subprocess.run([args.llamacpp_python, "-c", LLAMACPP, model], capture_output=True, text=True, check=True)
        ms["llama.cpp decode token"] = float(out.stdout.strip().splitlines()[-1])
    load = os.getloadavg()
    print(f"CPU ms a batch-1 decode step, {args.quantization}, 1 thread ({pagedllm.__file__}; load {load[0]:.1f}):")
    for k, v in ms.items():
        print(f"  {k:<40}{v:8.2f}")
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    out_path = RESULTS / f"step_cpu_time-{args.quantization}{label}-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    out_path.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "label": args.label,
                                    "pagedllm": pagedllm.__file__, "quantization": args.quantization,
                                    "load_average": load, "cpu_ms": ms, "python": sys.version.split()[0]}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
