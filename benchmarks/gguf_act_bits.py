"""What 15-bit activations cost against llama.cpp's q8 in the GGUF kernels, at batch 1.

`quantization="gguf"` quantises a QKV projection's activations to 15 bits and the other layers'
to q8 by default; `PAGEDLLM_GGUF_ACT_BITS` (8 or 15) sets every layer, which is what this script
compares. 15 bits are two int8 planes, so twice the vpdpbusd of q8 per group of weights. A batch-1 decode step reads
every weight once, so the question is how much of that extra arithmetic hides under the weight
reads. Measures, interleaving the two settings repeat by repeat (the machine is shared):

- each of SmolLM2-135M-Instruct's layer shapes on its own, from its real Q4_1 / Q8_0 blocks, with
  one activation row (a batch-1 decode step) and with `--rows` (a prefill chunk: there the kernel
  is bound by arithmetic and by re-reading the activations for every weight row);
- W2's batch-1 decode (one request, `--prompt-len` prompt tokens, `--output-len` greedy tokens)
  through `LLM.generate`, output tokens per second.

Both report the best of `--repeats` (the least disturbed by other jobs); the JSON keeps every sample.

Prints a table, writes JSON under benchmarks/results/.

    python benchmarks/gguf_act_bits.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ACT_BITS = (8, 15)


def gemv_times(repeats: int, iters: int, rows: int) -> dict:
    """Microseconds per call of each distinct layer shape of the default model, per act_bits and
    number of activation rows (1 and `rows`)."""
    from pagedllm import LLM

    llm = LLM(model=None, quantization="gguf", max_model_len=256, kv_cache_memory_bytes=16 << 20)
    model = llm.llm_engine.engine_core.core.model_executor.model_runner.model
    layer = model.layers[0]
    shapes = {"qkv_proj": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
              "gate_up_proj": layer.mlp.gate_up_proj, "down_proj": layer.mlp.down_proj,
              "lm_head": model.embed_tokens if model.tie_word_embeddings else model.lm_head}
    out: dict = {}
    for name, mod in shapes.items():
        w = mod.gguf_segments[0].weight
        out[name] = {"shape": list(w.shape), "bits": w.bits}
        for m in (1, rows):
            if name == "lm_head" and m > 1:
                continue  # a prefill computes the head for its last token only
            x = torch.randn(m, mod.gguf_input_size)
            n = max(1, iters // m)
            samples = {b: [] for b in ACT_BITS}
            for _ in range(repeats):
                for bits in ACT_BITS:
                    torch.ops.pagedllm_cpu.gguf_linear(x, w.qweight, w.scales, w.mins, None, w.bits, bits)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        torch.ops.pagedllm_cpu.gguf_linear(x, w.qweight, w.scales, w.mins, None, w.bits, bits)
                    samples[bits].append(1e6 * (time.perf_counter() - t0) / n)
            # the best of the repeats: the kernel's own cost, with the least of other jobs' time in it
            out[name][f"rows{m}"] = {f"act{b}_us": min(samples[b]) for b in ACT_BITS} | {
                f"act{b}_samples_us": samples[b] for b in ACT_BITS}
    llm.shutdown()
    return out


def decode_tok_s(repeats: int, prompt_len: int, output_len: int) -> dict:
    """W2's output tok/s per act_bits (the setting is read when a model is built: one LLM each)."""
    from pagedllm import LLM, SamplingParams

    llms = {}
    for bits in ACT_BITS:
        os.environ["PAGEDLLM_GGUF_ACT_BITS"] = str(bits)
        llms[bits] = LLM(model=None, quantization="gguf", max_model_len=prompt_len + output_len + 8,
                         kv_cache_memory_bytes=32 << 20)
    os.environ.pop("PAGEDLLM_GGUF_ACT_BITS")
    prompt = {"prompt_token_ids": [(17 * i) % 40000 + 100 for i in range(prompt_len)]}
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    samples = {b: [] for b in ACT_BITS}
    for bits in ACT_BITS:
        llms[bits].generate([prompt], params, use_tqdm=False)  # warm up
    for _ in range(repeats):
        for bits in ACT_BITS:
            t0 = time.perf_counter()
            llms[bits].generate([prompt], params, use_tqdm=False)
            samples[bits].append(output_len / (time.perf_counter() - t0))
    for llm in llms.values():
        llm.shutdown()
    paired = sorted(b / a for a, b in zip(samples[8], samples[15]))  # each repeat's two runs back to back
    return {f"act{b}_tok_s": max(samples[b]) for b in ACT_BITS} | {
        f"act{b}_samples": samples[b] for b in ACT_BITS} | {"median_paired_ratio": paired[len(paired) // 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=200, help="GEMV calls per timed sample (divided by the rows)")
    p.add_argument("--rows", type=int, default=64, help="activation rows of the prefill-shaped calls")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    gemv = gemv_times(args.repeats, args.iters, args.rows)
    decode = decode_tok_s(args.repeats, args.prompt_len, args.output_len)
    print(f"threads {args.threads}, load average at start {load[0]:.2f}")
    print(f"{'layer':<14}{'shape':>14}{'rows':>6}{'q8 us':>10}{'15-bit us':>11}{'ratio':>8}")
    for name, r in gemv.items():
        for m in (1, args.rows):
            if f"rows{m}" in r:
                t = r[f"rows{m}"]
                print(f"{name:<14}{str(tuple(r['shape'])):>14}{m:>6}{t['act8_us']:>10.1f}{t['act15_us']:>11.1f}"
                      f"{t['act15_us'] / t['act8_us']:>8.2f}")
    ratio = decode["act15_tok_s"] / decode["act8_tok_s"]
    print(f"W2 decode (batch 1): q8 {decode['act8_tok_s']:.1f} tok/s, 15-bit {decode['act15_tok_s']:.1f} tok/s, "
          f"ratio {ratio:.3f} (best of each); median of the repeats' paired ratios {decode['median_paired_ratio']:.3f}")
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"gguf_act_bits-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    path.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "threads": args.threads,
                                "load_average": load, "args": vars(args), "gemv": gemv, "decode": decode},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
