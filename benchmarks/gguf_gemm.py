"""The GGUF kernels' GEMV and tiled GEMM against `-q int8`'s oneDNN GEMM, on SmolLM2-135M's shapes.

For each linear layer shape of SmolLM2-135M (QKV, O, gate+up, down in Q4_1 as the shipped file
holds them; the tied LM head in Q8_0) and each row count, one layer call is timed three ways,
interleaved, best of `--repeats`: `gguf_gemm` (the GEMV kernel, 4 activation rows per weight row),
`gguf_gemm_tiled` (16 weight rows a vector, repacked per call) -- both including the activations'
q8 quantisation -- and `int8_linear` (oneDNN's int8 GEMM with its per-token quantisation and
rescale, on an int8 copy of the same weights). On one thread the clock is the thread's CPU time
(this machine is shared; time the core spends on other processes is left out). Prints GMAC/s and writes JSON under
benchmarks/results/. The crossover it shows sets `kTiledMinRows` in csrc/cpu/gguf_gemm_tiled.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from pagedllm import cpu_ops
from pagedllm.model_executor.layers.quantization import gguf_blocks, int8

RESULTS = Path(__file__).resolve().parent / "results"
# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads and 3 KV heads of 64, vocabulary 49152
SHAPES = {"qkv": (960, 576, "Q4_1"), "o": (576, 576, "Q4_1"), "gate_up": (3072, 576, "Q4_1"),
          "down": (576, 1536, "Q4_1"), "lm_head": (49152, 576, "Q8_0"),
          "down_q6k": (576, 1536, "Q6_K")}  # as Q4_K_M files hold some down projections: a scale per 16


def file_blocks(w: np.ndarray, type_name: str) -> np.ndarray:
    """`w` quantised to `type_name` as a file holds it: by gguf, or for Q6_K, which gguf cannot
    quantise, by the tests' writer (`tests/gguf_utils.quantize_q6_k`, as gguf_gemm_isa.py does)."""
    if type_name != "Q6_K":
        return gguf.quantize(w, gguf.GGMLQuantizationType[type_name])
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from gguf_utils import quantize_q6_k

    return quantize_q6_k(w)


def best_of(fn: Callable[[], object], repeats: int, clock: Callable[[], float], min_time: float = 0.02) -> float:
    """Seconds per call: best of `repeats` runs of enough calls to fill `min_time`."""
    fn()
    calls, start = 0, clock()
    while clock() - start < min_time:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            fn()
        best = min(best, (clock() - start) / calls)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,3,4,6,8,16,32,64,128,256")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # On one thread the calling thread's CPU time: the time other processes hold the core (this
    # machine is shared) is not counted. With more threads, wall time.
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    if not cpu_ops.cpu_kernels_available():
        raise SystemExit("the CPU kernels could not be built here")
    tiled = cpu_ops.gguf_gemm_tiled_min_rows() > 0
    rng = np.random.default_rng(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{'shape':>8} {'n x k':>12} {'rows':>5} | GMAC/s: {'gemv':>7} {'tiled':>7} {'int8':>7} | tiled/gemv tiled/int8")
    for name in args.shapes.split(","):
        n, k, type_name = SHAPES[name]
        w = rng.standard_normal((n, k)).astype(np.float32) * k**-0.5
        bw = gguf_blocks.decode(file_blocks(w, type_name), type_name)
        iw = int8.quantize_weight(bw.dequantize())
        for rows in rows_list:
            x = torch.randn(rows, k)
            out = torch.empty(rows, n)

            def gemv():
                cpu_ops.gguf_gemm(out, cpu_ops.quantize_q8_blocks(x), bw.qweight, bw.scales, bw.mins, None, bw.bits)

            def tile():
                cpu_ops.gguf_gemm_tiled(out, cpu_ops.quantize_q8_blocks(x), bw.qweight, bw.scales, bw.mins, None,
                                        bw.bits)

            def onednn():
                int8.int8_linear(x, iw, None)

            fns = {"gemv": gemv, "int8": onednn, **({"tiled": tile} if tiled else {})}
            secs = {key: float("inf") for key in fns}
            for _ in range(2):  # interleaved: each variant twice, best kept
                for key, fn in fns.items():
                    secs[key] = min(secs[key], best_of(fn, args.repeats, clock))
            gmacs = {key: rows * n * k / s / 1e9 for key, s in secs.items()}
            results.append(dict(shape=name, n=n, k=k, type=type_name, rows=rows,
                                seconds=secs, gmac_per_s=gmacs))
            t = gmacs.get("tiled", float("nan"))
            print(f"{name:>8} {f'{n}x{k}':>12} {rows:>5} | {'':7} {gmacs['gemv']:7.1f} {t:7.1f} {gmacs['int8']:7.1f}"
                  f" | {t / gmacs['gemv']:9.2f}x {t / gmacs['int8']:8.2f}x", flush=True)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    path = RESULTS / f"gguf_gemm-{stamp}-vm.json"
    path.write_text(json.dumps(dict(
        benchmark="gguf_gemm", threads=args.threads, clock=clock.__name__, repeats=args.repeats, machine=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(), load_average=os.getloadavg(), torch=torch.__version__, results=results), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
