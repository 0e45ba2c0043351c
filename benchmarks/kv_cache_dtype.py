"""What the KV-cache dtype buys at long context: bytes per token, and decode attention's time.

At long context a decode step reads every cached K/V once per layer, so the cache's bytes bound
attention as the weights' bytes bound the matmuls. This times the CPU decode kernel
(`pagedllm_cpu::paged_decode`) over one layer's cache for each `kv_cache_dtype`, with the default
model's attention shapes (9 query heads, 3 KV heads, head_dim 64), several sequences of a long
context, the dtypes interleaved round by round so that a busy machine slows them alike; and
reports how many tokens a GiB of cache holds for the whole model (30 layers).

Prints a table, writes JSON under benchmarks/results/.

    python benchmarks/kv_cache_dtype.py --context 4096 --seqs 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn,
          "fp8_e5m2": torch.float8_e5m2}
HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 9, 3, 64, 30, 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4096, help="cached tokens per sequence")
    p.add_argument("--seqs", type=int, default=8, help="sequences decoding at once")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from pagedllm import cpu_ops
    from pagedllm.attention.kv_quant import to_cache

    if not cpu_ops.cpu_kernels_available():
        raise SystemExit("the CPU kernels could not be built")
    blocks_per_seq = -(-args.context // BLOCK)
    num_blocks = args.seqs * blocks_per_seq
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen).view(args.seqs, blocks_per_seq)
    lens = torch.full((args.seqs,), args.context, dtype=torch.long)
    query = torch.randn(args.seqs, HEADS, HEAD_DIM, generator=gen)
    caches = {name: (to_cache(k, dt), to_cache(v, dt)) for name, dt in DTYPES.items()}
    outs = {name: torch.empty_like(query) for name in DTYPES}
    times: dict[str, list[float]] = {name: [] for name in DTYPES}
    for rnd in range(args.rounds + 2):
        for name, (kc, vc) in caches.items():
            start = time.perf_counter()
            cpu_ops.paged_decode(outs[name], query, kc, vc, tables, lens, HEAD_DIM**-0.5)
            if rnd >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["float32"])
    rows = []
    print(f"decode attention, one layer: {args.seqs} sequences x {args.context} cached tokens, "
          f"{HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}, {args.threads} threads")
    print(f"{'kv_cache_dtype':<16}{'bytes/token':>12}{'tokens/GiB':>12}{'ms/call':>10}{'vs float32':>12}"
          f"{'max |out - float32|':>22}")
    for name, (kc, _) in caches.items():
        per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * kc.element_size()
        ms = statistics.median(times[name]) * 1e3
        err = (outs[name] - outs["float32"]).abs().max().item()
        rows.append(dict(kv_cache_dtype=name, bytes_per_token=per_token, tokens_per_gib=(1 << 30) // per_token,
                         ms_per_call=ms, speedup_vs_float32=base * 1e3 / ms, max_abs_diff_vs_float32=err))
        print(f"{name:<16}{per_token:>12}{(1 << 30) // per_token:>12}{ms:>10.3f}{base * 1e3 / ms:>11.2f}x{err:>22.4f}")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    path = RESULTS / f"kv_cache_dtype-{stamp}-{platform.node()[:8] or 'host'}.json"
    path.write_text(json.dumps(dict(args=vars(args), cpu=platform.processor(), rows=rows), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
