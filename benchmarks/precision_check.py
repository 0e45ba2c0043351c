"""What a lower precision costs in quality: perplexity on a fixed text and greedy agreement, per dtype.

bfloat16 runs the matmuls on the CPU's bf16 units (AMX / AVX512-BF16 where present), several
times faster than float32, but it is a change of numerics like a quantisation: this script states
the change; so is `quantization="int8"` (W8A8 linear layers). For each variant it computes, with the same engine and model:

- the perplexity of a fixed text (`benchmarks/data/frozen_text.txt`, passages of public-domain
  texts: Lincoln, Dickens, Austen, the Declaration of Independence, Melville; frozen, so figures
  compare across runs; before 2026-12-04 it was docs/architecture.md; `--text` scores another,
  such as `kjv_excerpt.txt`, 25x longer: benchmarks/data/README.md), cut into windows of
  `--window` tokens, from the prompt logprobs of the tokens that are actually there. Each window
  is prefilled in chunks of `--chunk` tokens, so that later chunks attend to K/V read back from
  the cache: otherwise a narrower KV cache (`float32/bfloat16`) would never be read in scoring,
  as a prompt's own attention uses its unrounded K/V. Each change is printed with its standard
  error (from the per-token logprob differences to the first variant's, on the same tokens): a
  short text cannot resolve a small change;
- greedy continuations of a few fixed prompts, and how many of their tokens agree with
  float32's before the first difference.

Prints a table, writes JSON under benchmarks/results/.

    python benchmarks/precision_check.py --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TEXT = HERE / "data" / "frozen_text.txt"
PROMPTS = [
    "The capital of France is",
    "Explain what a KV cache is in one paragraph.",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def first_divergence(a: list[int], b: list[int]) -> int:
    """Number of leading tokens on which two greedy continuations agree."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def text_windows(ids: list[int], window: int) -> list[list[int]]:
    """The text's token ids cut into windows of `window` tokens (a last one of at least 2), each
    scored on its own, so that every engine sees the same contexts."""
    return [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]


def scored_logprobs(llm, windows: list[list[int]]) -> list[float]:
    """The logprob `llm` gives each token of each window after the first, from prompt logprobs."""
    from pagedllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [entry[w[pos]].logprob for w, out in zip(windows, outs)
            for pos, entry in enumerate(out.prompt_logprobs[1:], start=1)]


def evaluate(model: str | None, variant: str, window: int, chunk: int, max_tokens: int, text: Path = TEXT) -> dict:
    """`variant`: a dtype, optionally with a KV-cache dtype after a slash ('float32/bfloat16') and a
    quantization after a plus ('float32+int8', 'float32/bfloat16+int8'); 'gguf:act8' / 'gguf:act15'
    builds the GGUF layers with PAGEDLLM_GGUF_ACT_BITS set (every layer's activations at that width;
    plain 'gguf' is the default, QKV at 15 bits and the rest at 8)."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.model_executor.layers.quantization.gguf import ACT_BITS_ENV

    rest, _, quantization = variant.partition("+")
    quantization, _, act_bits = quantization.partition(":act")
    dtype, _, kv_cache_dtype = rest.partition("/")
    saved = os.environ.pop(ACT_BITS_ENV, None)
    if act_bits:
        os.environ[ACT_BITS_ENV] = act_bits  # read when the layers are built
    try:
        llm = LLM(model=model, dtype=dtype, kv_cache_dtype=kv_cache_dtype or "auto",
                  quantization=quantization or None, max_model_len=max(1024, window + 8),
                  max_num_batched_tokens=chunk)
    finally:
        os.environ.pop(ACT_BITS_ENV, None)
        if saved is not None:
            os.environ[ACT_BITS_ENV] = saved
    token_logprobs = scored_logprobs(llm, text_windows(llm.get_tokenizer().encode(text.read_text()), window))
    nll, count = -sum(token_logprobs), len(token_logprobs)
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    llm.shutdown()
    return {"dtype": variant, "perplexity": math.exp(nll / count), "scored_tokens": count,
            "token_logprobs": token_logprobs, "greedy": [o.outputs[0].token_ids for o in greedy]}


def llamacpp_perplexity(args: argparse.Namespace) -> dict:
    """The same windows scored by llama.cpp, in its own interpreter."""
    import subprocess
    import tempfile

    from pagedllm.model_executor.gguf_loader import load_gguf_tokenizer
    from pagedllm.model_executor.model_source import resolve_model

    path = resolve_model(args.model).path
    ids = load_gguf_tokenizer(path).encode(Path(args.text).read_text())
    windows = text_windows(ids, args.window)
    work = Path(tempfile.mkdtemp())
    (work / "windows.json").write_text(json.dumps({"model": path, "windows": windows}))
    subprocess.run([args.llamacpp_python, str(HERE / "peers" / "run_llamacpp_perplexity.py"), str(work / "windows.json"),
                    str(work / "out.json")], check=True)
    return json.loads((work / "out.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtypes", default="float32,bfloat16,float32/bfloat16,float32+int8",
                   help="comma-separated; 'D/K' is dtype D with a K KV cache (kv_cache_dtype), 'D+Q' dtype D "
                        "with quantization Q ('float32+int8', 'float32+gguf': the GGUF's own blocks)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk (the engine's step budget)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--text", default=str(TEXT),
                   help="the text to score (benchmarks/data/: frozen_text.txt, 940 tokens, or kjv_excerpt.txt, "
                        "23,800; see benchmarks/data/README.md)")
    p.add_argument("--llamacpp-python", default=None,
                   help="also score the same windows with llama.cpp on the same GGUF (its interpreter; "
                        "benchmarks/peers/run_llamacpp_perplexity.py)")
    args = p.parse_args()
    text = Path(args.text)
    results = [evaluate(args.model, d.strip(), args.window, args.chunk, args.max_tokens, text)
               for d in args.dtypes.split(",")]
    ref = results[0]
    peer = llamacpp_perplexity(args) if args.llamacpp_python else None
    print(f"fixed text: {text.name}, {ref['scored_tokens']} scored tokens; greedy: {len(PROMPTS)} prompts x "
          f"{args.max_tokens} tokens; reference {ref['dtype']}")
    print(f"{'variant':<26}{'perplexity':>12}{'change':>10}{'+-1 s.e.':>10}{'greedy tokens equal to ref':>30}")
    ref_logprobs = ref["token_logprobs"]
    for r in results:
        agree = [first_divergence(a, b) for a, b in zip(ref["greedy"], r["greedy"])]
        r["greedy_prefix_agreement"] = agree
        r["perplexity_change_pct"] = 100 * (r["perplexity"] / ref["perplexity"] - 1)
        # the change's standard error, from the per-token logprob differences to the reference (the
        # same tokens, so paired): how much of the change a text this long can resolve
        diffs = [a - b for a, b in zip(r.pop("token_logprobs"), ref_logprobs)]
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
        r["perplexity_change_se_pct"] = 100 * math.sqrt(var / len(diffs))
        total = sum(len(g) for g in ref["greedy"])
        print(f"{r['dtype']:<26}{r['perplexity']:>12.3f}{r['perplexity_change_pct']:>9.2f}%"
              f"{r['perplexity_change_se_pct']:>9.2f}%   {sum(agree)}/{total} (per prompt {agree})")
    if peer is not None:
        peer["perplexity_change_pct"] = 100 * (peer["perplexity"] / ref["perplexity"] - 1)
        print(f"{'llama.cpp (same GGUF)':<26}{peer['perplexity']:>12.3f}{peer['perplexity_change_pct']:>9.2f}%")
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"precision_check-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    out.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "text": text.name,
                               "window": args.window, "chunk": args.chunk, "results": results,
                               "llamacpp": peer}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
