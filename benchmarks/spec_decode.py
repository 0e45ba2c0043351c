"""What n-gram speculation buys one request on the default model, on text that repeats its prompt.

The workload is editing and quoting: each prompt hands SmolLM2-135M-Instruct a piece of code or prose
and asks for it back with a small change (rename a function, fix a typo, add a line), so most of the
answer is already in the prompt, the case prompt lookup is made for. Each request runs alone (batch 1),
greedy, up to `--max-tokens` tokens, once without speculation and once with
`{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": ..., "prompt_lookup_max": ...}`
per `k` asked for, interleaved, each the best of `--repeats`. Output tok/s is the request's output tokens
over its wall time (prefill included, as a user sees it); the table also gives the speed-up, the
acceptance rate (accepted / drafted tokens) and the mean acceptance length (tokens per verification
step), and checks that the speculative output equals the plain one token for token.

With `--draft-layers N` a `draft_model` run joins them: there is no smaller model of SmolLM2's tokenizer
on PyPI, so the draft is SmolLM2 cut to its first N decoder layers (its own embeddings, final norm and
tied LM head; written as a safetensors checkpoint in a temporary folder, nothing downloaded). With
`--eagle-head DIR` an `eagle` run joins them: DIR is an EAGLE-1 head for SmolLM2 (hidden size 576), e.g.
the one `benchmarks/train_eagle_head.py` trains on this CPU, or `--eagle-head random` / `zero`, a random
head or one whose layer adds nothing (it then proposes the token the target just emitted), written to a
temporary folder. Writes benchmarks/results/spec_decode-<date>-vm.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from pagedllm import LLM, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"

CODE = '''def total_price(items, tax_rate):
    """Sum the prices of the items and add the tax."""
    subtotal = 0.0
    for item in items:
        if item.quantity <= 0:
            continue
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return round(subtotal + tax, 2)


def cheapest(items):
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best
'''

PROSE = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, "
         "the members agreed to increase the funding for the public library by ten percent, to keep the "
         "swimming pool open during the summer, and to postpone the renovation of the town hall until the "
         "spring. The chair thanked everyone for their patience and closed the meeting at nine o'clock.")

TASKS = [
    f"Rename the function total_price to compute_total in this code and output the whole code:\n\n{CODE}",
    f"Output this code exactly as it is, in a code block:\n\n{CODE}",
    f"Add a docstring to the function cheapest and output the whole code, unchanged otherwise:\n\n{CODE}",
    f"Rewrite this text exactly, but replace Tuesday with Wednesday:\n\n{PROSE}",
    f"Copy this text word for word, then add one sentence summarising it:\n\n{PROSE}",
]


def truncated_draft(num_layers: int, folder: str) -> str:
    """The default model with only `num_layers` of its decoder layers, half from the bottom and half from the
    top (LayerSkip's self-speculation: the top layers still read what the LM head expects), as a Hugging Face
    checkpoint (float32)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from pagedllm.model_executor.gguf_loader import load_gguf_config, load_gguf_tokenizer
    from pagedllm.model_executor.model_source import resolve_model

    path = resolve_model(None).path
    config = load_gguf_config(path)
    total = config.num_hidden_layers
    kept = list(range((num_layers + 1) // 2)) + list(range(total - num_layers // 2, total))
    full = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=full)["tensors"]
    config.num_hidden_layers = num_layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if index not in kept:
                continue
            name = name.replace(f"model.layers.{index}.", f"model.layers.{kept.index(index)}.", 1)
        renamed[name] = tensor
    model.load_state_dict(renamed, strict=False)
    model.tie_weights()
    model.save_pretrained(folder)
    load_gguf_tokenizer(path).save_pretrained(folder)
    return folder


def untrained_eagle_head(kind: str, folder: str) -> str:
    """An EAGLE-1 head of SmolLM2's shape with random weights (`random`), or whose fc passes the target's hidden
    state through and whose layer adds nothing (`zero`: the target's LM head then reads h_p again, so the head
    guesses the token the target just emitted, a repetition)."""
    from safetensors.torch import save_file

    from pagedllm.model_executor.gguf_loader import load_gguf_config
    from pagedllm.model_executor.model_source import resolve_model

    config = load_gguf_config(resolve_model(None).path)
    h, inter = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = h // heads
    g = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (h, 2 * h), "layers.0.self_attn.q_proj.weight": (heads * d, h),
              "layers.0.self_attn.k_proj.weight": (kv * d, h), "layers.0.self_attn.v_proj.weight": (kv * d, h),
              "layers.0.self_attn.o_proj.weight": (h, heads * d), "layers.0.mlp.gate_proj.weight": (inter, h),
              "layers.0.mlp.up_proj.weight": (inter, h), "layers.0.mlp.down_proj.weight": (h, inter)}
    tensors = {name: torch.randn(*shape, generator=g) * 0.02 for name, shape in shapes.items()}
    tensors["layers.0.post_attention_layernorm.weight"] = torch.ones(h)
    if kind == "zero":
        tensors["fc.weight"] = torch.cat((torch.zeros(h, h), torch.eye(h)), dim=1)
        tensors["layers.0.self_attn.o_proj.weight"].zero_()
        tensors["layers.0.mlp.down_proj.weight"].zero_()
    save_file(tensors, f"{folder}/model.safetensors")
    rope = getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta", 1e4)
    with open(f"{folder}/config.json", "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
                   "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": 1,
                   "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": config.rms_norm_eps,
                   "rope_theta": rope, "max_position_embeddings": config.max_position_embeddings}, f)
    return folder


def run(llm: LLM, prompt: str, params: SamplingParams) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
    return time.perf_counter() - start, out.outputs[0].token_ids


def spec_counters(llm: LLM) -> dict[str, float]:
    values = {m.name.removeprefix("pagedllm:"): m.value for m in llm.get_metrics() if not m.labels}
    return {k: values[k] for k in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                                   "spec_decode_num_accepted_tokens")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--num-speculative-tokens", type=int, nargs="+", default=[3, 5])
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--draft-layers", type=int, default=0,
                   help="also run method draft_model with the default model cut to this many layers, half from "
                        "the bottom and half from the top (0: no draft_model run)")
    p.add_argument("--draft-k", type=int, default=3, help="num_speculative_tokens of the draft_model run")
    p.add_argument("--eagle-head", default=None,
                   help="also run method eagle with this EAGLE-1 head directory, or 'random' / 'zero' (an untrained "
                        "head written to a temporary folder)")
    p.add_argument("--eagle-k", type=int, default=3, help="num_speculative_tokens of the eagle run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steady figures on a shared machine, where spinning threads thrash)")
    p.add_argument("--show-text", action="store_true", help="print each task's answer once")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    configs: dict[str, dict | None] = {"none": None}
    for k in args.num_speculative_tokens:
        configs[f"ngram k={k}"] = {"method": "ngram", "num_speculative_tokens": k,
                                   "prompt_lookup_min": args.prompt_lookup_min,
                                   "prompt_lookup_max": args.prompt_lookup_max}
    draft_folder = tempfile.TemporaryDirectory(prefix="spec-draft-")
    if args.draft_layers:
        configs[f"draft {args.draft_layers}L k={args.draft_k}"] = {
            "method": "draft_model", "num_speculative_tokens": args.draft_k,
            "model": truncated_draft(args.draft_layers, draft_folder.name)}
    eagle_folder = tempfile.TemporaryDirectory(prefix="spec-eagle-")
    if args.eagle_head:
        head = (untrained_eagle_head(args.eagle_head, eagle_folder.name) if args.eagle_head in ("random", "zero")
                else args.eagle_head)
        label = args.eagle_head if args.eagle_head in ("random", "zero") else "trained"
        configs[f"eagle {label} k={args.eagle_k}"] = {"method": "eagle", "num_speculative_tokens": args.eagle_k,
                                                      "model": head}
    engines = {name: LLM(model=args.model, max_model_len=2048, speculative_config=spec, disable_log_stats=True)
               for name, spec in configs.items()}
    for llm in engines.values():  # warm-up: kernels built, first-step costs paid
        run(llm, TASKS[0], SamplingParams(temperature=0.0, max_tokens=8))

    best: dict[tuple[str, int], float] = {}
    tokens: dict[tuple[str, int], list[int]] = {}
    counters_before = {name: spec_counters(llm) for name, llm in engines.items()}
    for _ in range(args.repeats):
        for t, task in enumerate(TASKS):
            for name, llm in engines.items():  # interleaved: drifts in machine load hit every config alike
                elapsed, ids = run(llm, task, params)
                best[name, t] = min(best.get((name, t), float("inf")), elapsed)
                tokens[name, t] = ids
    if args.show_text:
        tokenizer = engines["none"].get_tokenizer()
        for t in range(len(TASKS)):
            print(f"--- task {t} ({len(tokens['none', t])} tokens) ---\n{tokenizer.decode(tokens['none', t])}")
    rows = []
    for name, llm in engines.items():
        after = spec_counters(llm)
        delta = {k: after[k] - counters_before[name][k] for k in after}
        out_tokens = sum(len(tokens[name, t]) for t in range(len(TASKS)))
        elapsed = sum(best[name, t] for t in range(len(TASKS)))
        rows.append({
            "config": name,
            "spec_config": configs[name],
            "output_tokens": out_tokens,
            "seconds": elapsed,
            "output_tok_per_s": out_tokens / elapsed,
            "per_task_tok_per_s": [len(tokens[name, t]) / best[name, t] for t in range(len(TASKS))],
            "acceptance_rate": (delta["spec_decode_num_accepted_tokens"] / delta["spec_decode_num_draft_tokens"]
                                if delta["spec_decode_num_draft_tokens"] else None),
            "mean_acceptance_length": (1 + delta["spec_decode_num_accepted_tokens"] / delta["spec_decode_num_drafts"]
                                       if delta["spec_decode_num_drafts"] else None),
            "identical_to_none": all(tokens[name, t] == tokens["none", t] for t in range(len(TASKS))),
        })
    base = rows[0]["output_tok_per_s"]
    print(f"{'config':<22}{'out tok/s':>11}{'speed-up':>10}{'accept %':>10}{'mean len':>10}{'same tokens':>13}")
    for row in rows:
        row["speedup"] = row["output_tok_per_s"] / base
        acc = f"{100 * row['acceptance_rate']:.1f}" if row["acceptance_rate"] is not None else "-"
        mlen = f"{row['mean_acceptance_length']:.2f}" if row["mean_acceptance_length"] is not None else "-"
        print(f"{row['config']:<22}{row['output_tok_per_s']:>11.1f}{row['speedup']:>9.2f}x{acc:>10}{mlen:>10}"
              f"{str(row['identical_to_none']):>13}")
    for llm in engines.values():
        llm.shutdown()
    draft_folder.cleanup()
    eagle_folder.cleanup()
    result = {"benchmark": "spec_decode", "date": datetime.now(timezone.utc).isoformat(), "machine": platform.node(),
              "processor": platform.processor() or platform.machine(), "args": vars(args),
              "tasks": [t[:80] for t in TASKS], "rows": rows}
    path = Path(args.output_json) if args.output_json else (
        RESULTS / f"spec_decode-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M')}-vm.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
