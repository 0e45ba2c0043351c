"""How much rounding error each way of quantising activations puts into SmolLM2's linear layers.

The GGUF kernels quantise every linear layer's input per block of 32 (`PAGEDLLM_GGUF_ACT_BITS`):
llama.cpp's q8 cost the default model +1.2% perplexity on the 940-token frozen text (+0.40% on the
longer KJV excerpt; `gguf_act_kinds.py` measures it per layer kind, which settled the default:
15 bits into QKV only), 15 bits -0.01%, but 15 bits takes two
`vpdpbusd` per weight byte where q8 takes one (docs/performance.md, *Why W1 at the default 15 bits
...*). This script asks whether a cheaper scheme gets most of the 15-bit accuracy: it runs
transformers' float32 model of the GGUF on the frozen text, captures each projection's input and
reports, per kind of layer (QKV, O, gate/up, down), summed over the layers:

- the squared rounding error of q8 with a scale per 16 and per 8 elements, and of 15 bits per 32,
  relative to q8 per 32 (an output's error variance grows with it, the weights being the same);
- for an adaptive scheme (15 bits only in each row's blocks of largest amax, q8 elsewhere), the
  share of blocks that must take 15 bits to bring the remaining error to 25% and 10% of q8's
  (a block's q8 error variance goes as its amax squared).

Prints a table, writes JSON under benchmarks/results/. No timing: the figures are deterministic.

    python benchmarks/activation_error.py --tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = Path(__file__).resolve().parent / "data" / "frozen_text.txt"
KINDS = {"q_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "down_proj": "down"}
SCHEMES = {"q8/32": (32, 127), "q8/16": (16, 127), "q8/8": (8, 127), "q15/32": (32, 16383)}
RESIDUALS = (0.25, 0.10)


def rounding_error(x: torch.Tensor, block: int, qmax: int) -> float:
    """Sum of squared errors of x quantised symmetrically to +-qmax with one scale per `block`."""
    xb = x.reshape(x.shape[0], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / qmax
    q = torch.where(d > 0, torch.round(xb / d.clamp_min(1e-30)), torch.zeros_like(xb))
    return float(((q * d - xb) ** 2).sum())


def adaptive_share(x: torch.Tensor, residual: float) -> float:
    """Mean share of a row's blocks of 32 that need 15 bits for the rest's q8 error to be `residual`
    of the whole row's (largest amax first)."""
    a = x.reshape(x.shape[0], -1, 32).abs().amax(-1) ** 2
    s, _ = a.sort(-1, descending=True)
    share = s.cumsum(-1) / s.sum(-1, keepdim=True).clamp_min(1e-30)
    need = (share < 1 - residual).sum(-1) + 1
    return float((need.float() / a.shape[1]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="a registered name or a GGUF path")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pagedllm.model_executor.model_source import resolve_model

    hf_logging.set_verbosity_error()
    path = resolve_model(args.model).path
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[:, :args.tokens]

    errors: dict[str, dict[str, float]] = {k: dict.fromkeys(SCHEMES, 0.0) for k in KINDS.values()}
    shares: dict[str, dict[float, list[float]]] = {k: {r: [] for r in RESIDUALS} for k in KINDS.values()}

    def capture(kind: str):
        def hook(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            for scheme, (block, qmax) in SCHEMES.items():
                errors[kind][scheme] += rounding_error(x, block, qmax)
            for r in RESIDUALS:
                shares[kind][r].append(adaptive_share(x, r))
        return hook

    for name_, module in model.named_modules():
        kind = KINDS.get(name_.rsplit(".", 1)[-1])
        if kind is not None:
            module.register_forward_pre_hook(capture(kind))
    with torch.no_grad():
        model(ids)

    rows = []
    print(f"{'layer':>8} | error variance vs q8/32: {'q8/16':>6} {'q8/8':>6} {'q15/32':>8} | "
          f"15-bit share for {', '.join(f'{r:.0%}' for r in RESIDUALS)} of q8's error")
    for kind in KINDS.values():
        base = errors[kind]["q8/32"]
        rel = {s: errors[kind][s] / base for s in SCHEMES}
        adaptive = {f"{r:.2f}": sum(v) / len(v) for r, v in shares[kind].items()}
        rows.append({"layer": kind, "error_vs_q8_32": rel, "adaptive_15bit_share": adaptive})
        print(f"{kind:>8} | {'':24}{rel['q8/16']:>6.3f} {rel['q8/8']:>6.3f} {rel['q15/32']:>8.1e} | "
              + "  ".join(f"{v:.0%}" for v in adaptive.values()))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    out = RESULTS / f"activation_error-{stamp}-vm.json"
    out.write_text(json.dumps({"benchmark": "activation_error", "model": args.model, "tokens": int(ids.shape[1]),
                               "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
