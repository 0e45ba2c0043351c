"""Which of a model's layer kinds q8 activations hurt: the evidence behind the GGUF layers' widths.

`quantization="gguf"` quantises a QKV projection's input to 15 bits and every other layer's to
llama.cpp's q8_1 (`layers/quantization/gguf.py`, `activation_bits`): 15 bits take two `vpdpbusd`
per weight byte where q8 takes one, so they are spent where q8 costs the most. This script builds
the GGUF model once, then sets each layer's width in place (`gguf_act_bits`, which the kernels
read per call) and scores a frozen text through the engine's prompt logprobs for:

- every layer at 15 bits, and every layer at q8;
- q8 in one kind of layer only (QKV, O, gate/up, down, the LM head), 15 bits elsewhere;
- the default (15 bits in QKV only).

For each: the perplexity change against the float32 model of the same file (the GGUF dequantised)
with its standard error, and the RMS of the per-token logprob differences (a steadier measure of
how much a setting moves the model than the perplexity of a short text). No timing.

    python benchmarks/gguf_act_kinds.py --text benchmarks/data/kjv_excerpt.txt
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from precision_check import scored_logprobs, text_windows  # this script's directory is on sys.path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KINDS = ("qkv", "o", "gate_up", "down", "head")


def layers_of_kind(model: torch.nn.Module, kind: str) -> list[torch.nn.Module]:
    if kind == "head":
        return [model.embed_tokens if model.tie_word_embeddings else model.lm_head]
    attr = {"qkv": ("self_attn", "qkv_proj"), "o": ("self_attn", "o_proj"), "gate_up": ("mlp", "gate_up_proj"),
            "down": ("mlp", "down_proj")}[kind]
    return [getattr(getattr(layer, attr[0]), attr[1]) for layer in model.layers]


def token_logprobs(llm, windows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(scored_logprobs(llm, windows), dtype=torch.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a GGUF (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=str(HERE / "data" / "frozen_text.txt"))
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk (the engine's step budget)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pagedllm import LLM

    settings = {"all 15-bit": (), "all q8": KINDS, **{f"q8 in {k} only": (k,) for k in KINDS},
                "default (15-bit in qkv only)": ("o", "gate_up", "down", "head")}
    common = dict(model=args.model, max_model_len=max(1024, args.window + 8), max_num_batched_tokens=args.chunk)
    ref_llm = LLM(**common)
    ids = ref_llm.get_tokenizer().encode(Path(args.text).read_text())
    windows = text_windows(ids, args.window)
    ref = token_logprobs(ref_llm, windows)
    ref_llm.shutdown()
    llm = LLM(quantization="gguf", **common)
    model = llm.llm_engine.engine_core.core.model_executor.model_runner.model
    rows = []
    print(f"{Path(args.text).name}: {len(ref)} scored tokens, float32 perplexity {math.exp(-ref.mean()):.4f}")
    print(f"{'setting':<30}{'perplexity':>12}{'change':>9}{'+-1 s.e.':>10}{'RMS dlogprob':>14}")
    for name, q8_kinds in settings.items():
        for kind in KINDS:
            for layer in layers_of_kind(model, kind):
                layer.gguf_act_bits = 8 if kind in q8_kinds else 15
        diff = token_logprobs(llm, windows) - ref
        change = 100 * math.expm1(-diff.mean().item())
        se = 100 * (diff.std() / math.sqrt(len(diff))).item()
        rms = diff.pow(2).mean().sqrt().item()
        rows.append(dict(setting=name, q8_kinds=list(q8_kinds), perplexity=math.exp(-(ref + diff).mean().item()),
                         change_pct=change, change_se_pct=se, rms_logprob_diff=rms))
        print(f"{name:<30}{rows[-1]['perplexity']:>12.4f}{change:>8.2f}%{se:>9.2f}%{rms:>14.4f}", flush=True)
    llm.shutdown()
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gguf_act_kinds-{Path(args.text).stem}-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    out.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "text": Path(args.text).name,
                               "scored_tokens": len(ref), "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
