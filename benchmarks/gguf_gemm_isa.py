"""The GGUF GEMV per instruction set: the native (AVX-512 VNNI) build against `PAGEDLLM_CPU_ISA=avx2`
(and `avxvnni`), and the portable loop, on SmolLM2-135M's layer shapes.

Each build runs in its own process (the ISA is a build choice, `pagedllm/cpu_ops.py`); the parent
runs the processes in turn, `--rounds` times each, and keeps each figure's best, so the ratios
come from one run. A layer call is `quantize_q8_blocks` + `gguf_gemm` (15-bit activations, the
default of quantization="gguf"), timed on the thread's CPU time at one thread, and the
quantisation alone (AVX-512 in the native build, a scalar loop in the others). "portable" is the
native build's `vectorised=False` loop (what a CPU with neither AVX-512 VNNI nor AVX2 runs, though
compiled here with -march=native). Prints µs per call and ratios; writes JSON under
benchmarks/results/.
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

RESULTS = Path(__file__).resolve().parent / "results"
# SmolLM2-135M's GEMV shapes (n, k, GGUF type) as the shipped Q4_1 file holds them
SHAPES = {"qkv": (960, 576, "Q4_1"), "o": (576, 576, "Q4_1"), "gate_up": (3072, 576, "Q4_1"),
          "down": (576, 1536, "Q4_1"), "lm_head": (49152, 576, "Q8_0"), "q6_k": (576, 1536, "Q6_K")}


def measure(rows_list: list[int], repeats: int, act_bits: int) -> dict:
    """In a worker process: µs per layer call for each shape and row count, this build's vector
    GEMV (and, in the native build, the portable loop)."""
    import gguf
    import numpy as np
    import torch

    from pagedllm import cpu_ops
    from pagedllm.model_executor.layers.quantization import gguf_blocks
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from gguf_utils import quantize_q6_k

    torch.set_num_threads(1)
    if not cpu_ops.cpu_kernels_available():
        raise SystemExit("the CPU kernels could not be built here")
    isa = torch.ops.pagedllm_cpu.gguf_gemm_vector_isa()
    from gguf_gemm import best_of  # this script's directory is on sys.path

    rng = np.random.default_rng(0)
    out: dict = {"vector_isa": isa, "figures": {}}
    for name, (n, k, type_name) in SHAPES.items():
        w = rng.standard_normal((n, k)).astype(np.float32) * k**-0.5
        raw = quantize_q6_k(w) if type_name == "Q6_K" else gguf.quantize(w, gguf.GGMLQuantizationType[type_name])
        bw = gguf_blocks.decode(raw, type_name)
        for rows in rows_list:
            x = torch.randn(rows, k)
            res = torch.empty(rows, n)
            def quantize():
                cpu_ops.quantize_q8_blocks(x, act_bits)
            # the activations' quantisation alone (AVX-512 in the native build, the portable loop else)
            out["figures"][f"{name}/{rows}/quantize"] = best_of(quantize, repeats, time.thread_time) * 1e6
            variants = {"vector": True}
            if cpu_ops.cpu_isa() == "native":
                variants["portable"] = False
            for label, vec in variants.items():
                def call(vec=vec):
                    cpu_ops.gguf_gemm(res, cpu_ops.quantize_q8_blocks(x, act_bits), bw.qweight, bw.scales, bw.mins,
                                      None, bw.bits, vec)
                secs = best_of(call, repeats, time.thread_time)
                out["figures"][f"{name}/{rows}/{label}"] = secs * 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isas", default="native,avx2,avxvnni")
    p.add_argument("--rows", default="1,4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--act-bits", type=int, default=15, choices=[8, 15])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.worker:
        print(json.dumps(measure(rows_list, args.repeats, args.act_bits)))
        return
    isas = args.isas.split(",")
    best: dict[str, dict[str, float]] = {}
    vector_isa: dict[str, str] = {}
    root = str(Path(__file__).resolve().parent.parent)
    for _ in range(args.rounds):
        for isa in isas:
            env = dict(os.environ, PAGEDLLM_CPU_ISA=isa, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.run([sys.executable, __file__, "--worker", "--rows", args.rows,
                                   "--repeats", str(args.repeats), "--act-bits", str(args.act_bits)],
                                  env=env, cwd=root, capture_output=True, text=True, check=True)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            vector_isa[isa] = got["vector_isa"]
            for key, us in got["figures"].items():
                kind = key.rsplit("/", 1)[1]
                label = {"vector": isa, "portable": "portable"}.get(kind, f"{kind}:{isa}")
                fig = best.setdefault(key.rsplit("/", 1)[0], {})
                fig[label] = min(fig.get(label, float("inf")), us)
    cols = [*isas, "portable"]
    qcols = [f"quantize:{isa}" for isa in isas]
    print(f"vector GEMV per build: {vector_isa}; {args.act_bits}-bit activations, one thread, µs per call")
    print(f"{'shape':>8} {'n x k':>11} {'type':>5} {'rows':>4} | " + " ".join(f"{c:>9}" for c in cols)
          + " | " + " ".join(f"{c + '/nat':>12}" for c in cols[1:]) + " | quantize µs: " + " ".join(isas))
    results = []
    for key, fig in best.items():
        name, rows = key.split("/")
        n, k, type_name = SHAPES[name]
        base = fig.get("native", float("nan"))
        print(f"{name:>8} {f'{n}x{k}':>11} {type_name:>5} {rows:>4} | "
              + " ".join(f"{fig.get(c, float('nan')):9.1f}" for c in cols)
              + " | " + " ".join(f"{fig.get(c, float('nan')) / base:11.2f}x" for c in cols[1:])
              + " | " + " ".join(f"{fig.get(c, float('nan')):.2f}" for c in qcols))
        results.append(dict(shape=name, n=n, k=k, type=type_name, rows=int(rows), us_per_call=fig))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    path = RESULTS / f"gguf_gemm_isa-{stamp}-vm.json"
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    path.write_text(json.dumps(dict(
        benchmark="gguf_gemm_isa", act_bits=args.act_bits, threads=1, clock="thread_time", rounds=args.rounds,
        repeats=args.repeats, vector_isa=vector_isa, machine=platform.processor() or platform.machine(),
        cpu_flags=[f for f in flags if f.startswith(("avx", "fma", "f16c"))], cpu_count=os.cpu_count(),
        load_average=os.getloadavg(), results=results), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
