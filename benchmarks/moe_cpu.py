"""The fused-MoE CPU path against the PyTorch reference, on a Mixtral-shaped layer.

One `FusedMoE` layer (`pagedllm/model_executor/layers/fused_moe/`) with Mixtral's routing (8
experts, top-2, renormalised) and Mixtral's shape scaled down 4x so a sweep runs in about a minute
here (hidden 1024, expert intermediate 3584; Mixtral-8x7B: 4096 and 14336). The same random weights
are held twice: plain, run by the reference (`reference.py`: tokens sorted by expert, `F.linear` per
expert, `index_add_`), and packed per expert for oneDNN, run by the CPU path (`cpu.py`). Each batch
size is timed for both, interleaved, best of `--repeats` (the layer's forward: routing, experts and
the weighted sum; both with the eager SiLU-and-mul), and the outputs are compared. Decode batches are 1-64 tokens; prefill chunks are
the larger ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from pagedllm.model_executor.layers.fused_moe import FusedMoE
from pagedllm.model_executor.layers.fused_moe.cpu import CpuFusedMoEMethod
from pagedllm.model_executor.layers.fused_moe.reference import UnquantizedFusedMoEMethod

RESULTS = Path(__file__).resolve().parent / "results"
NUM_EXPERTS, TOP_K = 8, 2


def build_layers(hidden: int, intermediate: int, dtype: torch.dtype) -> tuple[FusedMoE, FusedMoE]:
    """The reference layer and the CPU-path layer, on the same random weights."""
    generator = torch.Generator().manual_seed(0)
    w13 = (torch.randn(NUM_EXPERTS, 2 * intermediate, hidden, generator=generator) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(NUM_EXPERTS, hidden, intermediate, generator=generator) * intermediate**-0.5).to(dtype)
    layers = []
    for method in (UnquantizedFusedMoEMethod(), CpuFusedMoEMethod()):
        layer = FusedMoE(NUM_EXPERTS, TOP_K, hidden, intermediate, renormalize=True, quant_method=method)
        layer.w13_weight.data = w13
        layer.w2_weight.data = w2
        method.process_weights_after_loading(layer)
        layers.append(layer)
    return layers[0], layers[1]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--intermediate-size", type=int, default=3584)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    reference, cpu = build_layers(args.hidden_size, args.intermediate_size, dtype)
    generator = torch.Generator().manual_seed(1)
    router = torch.randn(NUM_EXPERTS, args.hidden_size, generator=generator)

    print(f"Mixtral-shaped MoE layer: {NUM_EXPERTS} experts, top-{TOP_K}, hidden {args.hidden_size}, "
          f"intermediate {args.intermediate_size}, {args.dtype}, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'tokens':>7}{'reference ms':>14}{'CPU path ms':>13}{'speed-up':>10}{'max |diff|':>12}")
    rows = []
    with torch.inference_mode():
        for num_tokens in [int(b) for b in args.batch_sizes.split(",")]:
            x = torch.randn(num_tokens, args.hidden_size, generator=generator).to(dtype)
            logits = x.float() @ router.T
            ref_out, cpu_out = reference(x, logits), cpu(x, logits)  # warm-up, and the check
            diff = (ref_out.float() - cpu_out.float()).abs().max().item()
            times = {"reference": float("inf"), "cpu": float("inf")}
            for _ in range(args.repeats):  # interleaved: the machine's load drifts
                times["reference"] = min(times["reference"], timed(lambda: reference(x, logits)))
                times["cpu"] = min(times["cpu"], timed(lambda: cpu(x, logits)))
            ratio = times["reference"] / times["cpu"]
            print(f"{num_tokens:7d}{times['reference'] * 1e3:14.2f}{times['cpu'] * 1e3:13.2f}{ratio:9.2f}x"
                  f"{diff:12.1e}")
            rows.append({"num_tokens": num_tokens, "reference_ms": times["reference"] * 1e3,
                         "cpu_path_ms": times["cpu"] * 1e3, "speedup": ratio, "max_abs_diff": diff})
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"moe_cpu-{args.dtype}-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    out.write_text(json.dumps({
        "date": stamp.isoformat(), "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "num_experts": NUM_EXPERTS, "top_k": TOP_K, "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size, "dtype": args.dtype, "threads": args.threads,
        "repeats": args.repeats, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
