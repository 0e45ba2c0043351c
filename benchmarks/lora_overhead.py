"""What LoRA costs: W1's batch spread over 4 adapters against the same batch on the base model.

W1 is the default model (SmolLM2-135M-Instruct), 32 prompts of 32-256 random ids, 64 greedy output
tokens each, EOS ignored. Four random rank-`--rank` adapters on all seven projections (PEFT's
format, written here) are given round-robin to the 32 requests, so every step mixes all four (in
`max_loras=4` slots). Three runs, interleaved, each the best of `--repeats`: an engine without
LoRA, the LoRA engine on base-model requests, and the LoRA engine on the adapters (loaded in a
warm-up first, so the figure is the steady state of serving them, not reading them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import random_requests
from pagedllm.lora.peft_loader import SUPPORTED_TARGETS, projection_shapes
from pagedllm.lora.request import LoRARequest

RESULTS = Path(__file__).resolve().parent / "results"


def write_random_adapter(path: str, hf_config, rank: int, seed: int) -> str:
    """A PEFT LoRA adapter of random weights for every projection of every layer."""
    os.makedirs(path, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for target, (n_out, n_in) in projection_shapes(hf_config).items():
            block = "self_attn" if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n_in, generator=generator) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=generator) * 0.02
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(SUPPORTED_TARGETS),
                   "bias": "none"}, f)
    return path


def run_once(llm: LLM, prompts: list, params: SamplingParams, loras: list | None) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)

    plain = LLM(max_model_len=512)
    mc = plain.llm_engine.config.model_config
    reqs = random_requests(32, (32, 256), (64, 64), mc.vocab_size, seed=0,
                           avoid_ids=frozenset(plain.get_tokenizer().all_special_ids))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    with tempfile.TemporaryDirectory() as tmp:
        loras = [LoRARequest(f"adapter{i}", i + 1, write_random_adapter(f"{tmp}/a{i}", mc.hf_config, args.rank, i))
                 for i in range(args.num_adapters)]
        with_lora = LLM(max_model_len=512, enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank)
        warm = SamplingParams(max_tokens=2)
        plain.generate(prompts[:2], warm, use_tqdm=False)
        # every adapter read and put in its slot before the clock starts
        with_lora.generate(prompts[: args.num_adapters], warm, use_tqdm=False, lora_request=loras)
    spread = [loras[i % len(loras)] for i in range(len(prompts))]
    runs = [("no LoRA (enable_lora=False)", plain, None),
            ("enable_lora=True, base-model requests", with_lora, None),
            (f"enable_lora=True, {args.num_adapters} adapters of rank {args.rank} mixed", with_lora, spread)]
    # Interleaved, best of --repeats each: the machine's load drifts, and drift must not favour one run.
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeats):
        for name, llm, lora in runs:
            wall, tokens = run_once(llm, prompts, params, lora)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, tokens)
    rows = [(name, *best[name]) for name, _, _ in runs]
    plain.shutdown()
    with_lora.shutdown()

    base = rows[0][2] / rows[0][1]
    print(f"W1 (32 requests x 64 output tokens), {args.threads} threads, best of {args.repeats}")
    print(f"{'run':<48}{'wall s':>8}{'output tok/s':>14}{'vs no LoRA':>12}")
    results = []
    for name, wall, tokens in rows:
        tps = tokens / wall
        print(f"{name:<48}{wall:8.2f}{tps:14.1f}{tps / base:11.2f}x")
        results.append({"run": name, "wall_s": wall, "output_tokens": tokens, "output_tok_s": tps,
                         "ratio_to_no_lora": tps / base})
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"lora_overhead-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    out.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "rank": args.rank,
                               "num_adapters": args.num_adapters, "threads": args.threads, "results": results},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
