"""GPTQ int4 on CPU: the dequantized float layers against the blocks kernel (`PAGEDLLM_CPU_INT4_BLOCKS=1`),
in one run.

1. Layers of GPTQ shapes (random int4 words, groups of 128 or 64; with and without act order): the microseconds of
   one `apply` at a few batch sizes, and the bytes each form holds. Forms alternate repeat by repeat.
2. A model (`--checkpoint`, a GPTQ folder; by default SmolLM2-135M-Instruct's GGUF, dequantized and
   written as GPTQ int4 g64 by `tests/quant_checkpoints.py`): weight bytes, decode tokens/s of one
   request (and its 128-token prefill), and the perplexity of `benchmarks/data/frozen_text.txt` in each form.

Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/int4_cpu.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from precision_check import scored_logprobs, text_windows  # this script's directory is on sys.path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the GPTQ writer the tests use
RESULTS = HERE / "results"
TEXT = HERE / "data" / "frozen_text.txt"
ENV = "PAGEDLLM_CPU_INT4_BLOCKS"
FORMS = ("dequantized", "blocks")


def gptq_layer(in_size: int, out_size: int, form: str, act_order: bool, seed: int = 0):
    """A row-parallel GPTQ int4 layer of random words, groups of 128 (64 where the input size needs it),
    held in `form` (oneDNN-packed when dequantized)."""
    from pagedllm.model_executor.layers.cpu_packed_linear import CpuPackedLinearMethod
    from pagedllm.model_executor.layers.linear import RowParallelLinear
    from pagedllm.model_executor.layers.quantization.gptq import GPTQConfig

    group = group_size(in_size)
    config = GPTQConfig(bits=4, group_size=group, desc_act=act_order, sym=False)
    layer = RowParallelLinear(in_size, out_size, linear_method=config.linear_method(CpuPackedLinearMethod(), form))
    gen = torch.Generator().manual_seed(seed)
    for name, param in layer.named_parameters():
        if name == "g_idx":
            order = torch.randperm(in_size, generator=gen) if act_order else torch.arange(in_size)
            param.copy_(order // group)
        elif param.dtype == torch.int32:
            param.copy_(torch.randint(-2**31, 2**31 - 1, param.shape, generator=gen).to(torch.int32))
        else:
            param.copy_((torch.rand(param.shape, generator=gen) * 0.01 + 0.001).half().float())
    layer.linear_method.process_weights_after_loading(layer)
    return layer


def group_size(in_size: int) -> int:
    return 128 if in_size % 128 == 0 else 64


def time_layers(shapes: list[tuple[int, int]], batches: list[int], repeats: int) -> list[dict]:
    rows = []
    for in_size, out_size in shapes:
        for act_order in (False, True):
            layers = {form: gptq_layer(in_size, out_size, form, act_order) for form in FORMS}
            for m in batches:
                x = torch.randn(m, in_size)
                best = {form: math.inf for form in FORMS}
                calls = max(3, int(2e7 // (in_size * out_size)))
                with torch.no_grad():
                    for _ in range(repeats):
                        for form in FORMS:  # interleaved, so the machine's load hits both alike
                            layer = layers[form]
                            layer(x)
                            start = time.perf_counter()
                            for _ in range(calls):
                                layer(x)
                            best[form] = min(best[form], (time.perf_counter() - start) / calls)
                rows.append({"in": in_size, "out": out_size, "group": group_size(in_size), "act_order": act_order,
                             "batch": m,
                             **{f"{form}_us": best[form] * 1e6 for form in FORMS},
                             **{f"{form}_bytes": layers[form].linear_method.weight_bytes(layers[form])
                                for form in FORMS},
                             "speedup": best["dequantized"] / best["blocks"]})
    return rows


def smollm2_gptq(folder: str) -> str:
    """SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized by transformers) written as a GPTQ int4 g64 checkpoint."""
    from quant_checkpoints import write_quantized_checkpoint
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedllm.model_executor.model_source import resolve_model

    gguf = Path(resolve_model(None).path)
    plain, quantized = os.path.join(folder, "plain"), os.path.join(folder, "gptq")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    os.makedirs(plain, exist_ok=True)
    tied = model.config.tie_word_embeddings
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
              os.path.join(plain, "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):  # transformers marks a GGUF-loaded model
        del model.config.quantization_config
    model.config.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    write_quantized_checkpoint(plain, quantized, os.path.join(folder, "reference"), "gptq", sym=False, group_size=64)
    return quantized


def run_model(checkpoint: str, form: str, prompt_len: int, output_len: int, window: int) -> dict:
    from pagedllm import LLM, SamplingParams

    os.environ[ENV] = "1" if form == "blocks" else "0"
    llm = LLM(model=checkpoint, max_model_len=1024, kv_cache_memory_bytes=64 << 20)
    try:
        weight_bytes = llm.llm_engine.engine_core.core.model_executor.collective_rpc("weight_bytes")[0]
        ids = llm.get_tokenizer().encode(TEXT.read_text())
        logprobs = scored_logprobs(llm, text_windows(ids, window))
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        prompt = [{"prompt_token_ids": ids[:prompt_len]}]
        llm.generate(prompt, params, use_tqdm=False)  # warm-up
        llm.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        prefill = time.perf_counter() - start
        llm.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        total = time.perf_counter() - start
    finally:
        llm.shutdown()
    return {"form": form, "weight_bytes": weight_bytes, "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
            "logprobs": logprobs, "prefill_s": prefill, "decode_tok_s": (output_len - 1) / max(total - prefill, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--checkpoint", help="a GPTQ folder (default: SmolLM2-135M as GPTQ int4 g64)")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    # SmolLM2's fused gate/up and down; a 7B model's q projection and down projection
    shapes = [(576, 3072), (1536, 576), (4096, 4096), (11008, 4096)]
    load = os.getloadavg()
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "load_before": load, "layers": time_layers(shapes, batches, args.repeats)}
    print(f"layers: GPTQ int4, {args.threads} thread(s), load {load[0]:.2f}")
    print(f"{'in x out':>12} {'group':>5} {'act':>4} {'batch':>5} {'float us':>9} {'blocks us':>9} {'speedup':>8} "
          f"{'float MiB':>9} {'blocks MiB':>10}")
    for r in result["layers"]:
        print(f"{r['in']:>5} x {r['out']:<5} {r['group']:>5} {'yes' if r['act_order'] else 'no':>4} {r['batch']:>5} "
              f"{r['dequantized_us']:>9.1f} {r['blocks_us']:>9.1f} {r['speedup']:>7.2f}x "
              f"{r['dequantized_bytes'] / 2**20:>9.2f} {r['blocks_bytes'] / 2**20:>10.2f}")
    if not args.skip_model:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = args.checkpoint or smollm2_gptq(folder)
            models = [run_model(checkpoint, form, args.prompt_len, args.output_len, args.window) for form in FORMS]
        a, b = (m["logprobs"] for m in models)
        diffs = sorted(abs(x - y) for x, y in zip(a, b))
        result["model"] = {"checkpoint": args.checkpoint or "SmolLM2-135M-Instruct as GPTQ int4 g64 (RTN)",
                           "forms": [{k: v for k, v in m.items() if k != "logprobs"} for m in models],
                           "logprob_diff_max": diffs[-1], "logprob_diff_median": diffs[len(diffs) // 2],
                           "scored_tokens": len(diffs), "load_after": os.getloadavg()}
        print(f"\nmodel: {result['model']['checkpoint']}")
        print(f"{'form':>12} {'weights MiB':>11} {'prefill s':>9} {'decode tok/s':>12} {'perplexity':>10}")
        for m in models:
            print(f"{m['form']:>12} {m['weight_bytes'] / 2**20:>11.1f} {m['prefill_s']:>9.3f} {m['decode_tok_s']:>12.1f} "
                  f"{m['perplexity']:>10.3f}")
        print(f"per-token logprob |blocks - dequantized| over {len(diffs)} tokens: median {diffs[len(diffs) // 2]:.4f}, "
              f"max {diffs[-1]:.4f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"int4_cpu-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M')}-vm.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
