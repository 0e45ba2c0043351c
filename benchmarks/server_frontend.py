"""Thread or process for the engine core behind `pagedllm serve`? Measured, not guessed.

For each model and each `--engine-core` (thread: the engine loop in a background thread of the
server process; process: in a process of its own, vLLM v1's layout), start the real server on
127.0.0.1 and load it with `pagedllm bench serve`'s client: random token-id prompts (32-256 tokens),
64 greedy output tokens each with EOS ignored, all requests sent at once, `--max-concurrency`
streams at a time. The offline engine (`LLM.generate`, no HTTP) on the same requests is the
ceiling. Prints a table and writes JSON under benchmarks/results/.

The load generator runs on the same machine and takes CPU from the server; on the 2-core CI box
that matters, and it weighs the same on both layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import server_process
from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import random_requests
from pagedllm.benchmarks.serve import run_serve

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NUM_OUTPUT = 64


def start_server(model: str | None, mode: str, threads: int, max_model_len: int,
                 dtype: str = "float32", kv_cache_dtype: str = "auto",
                 max_num_batched_tokens: int | None = None, quantization: str | None = None,
                 ) -> tuple[subprocess.Popen, str]:
    args = [*([model] if model else []), "--engine-core", mode, "--max-model-len", str(max_model_len),
            "--dtype", dtype, "--kv-cache-dtype", kv_cache_dtype,
            *(["--max-num-batched-tokens", str(max_num_batched_tokens)] if max_num_batched_tokens else []),
            *(["--quantization", quantization] if quantization else []),
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    env = {"OMP_NUM_THREADS": str(threads), "PAGEDLLM_LOGGING_LEVEL": "WARNING"}
    log = tempfile.NamedTemporaryFile("w", prefix="server-frontend-", suffix=".log", delete=False)
    log.close()
    return server_process.start_server(args, log.name, env)


def bench_args(url: str, vocab: int, num_prompts: int, concurrency: int, seed: int) -> argparse.Namespace:
    return argparse.Namespace(base_url=url, model=None, api_key=None, num_prompts=num_prompts, input_len="32-256",
                              output_len=str(NUM_OUTPUT), vocab_size=vocab, request_rate=float("inf"),
                              max_concurrency=concurrency, dataset_seed=seed, timeout=600.0, output_json=None)


def offline_ceiling(model: str | None, vocab: int, num_prompts: int, concurrency: int, threads: int,
                    max_model_len: int, seed: int, dtype: str = "float32", kv_cache_dtype: str = "auto",
                    quantization: str | None = None) -> float:
    """Output tokens/s of the bare engine on the same requests, `concurrency` at a time."""
    import torch

    torch.set_num_threads(threads)
    llm = LLM(model=model, max_model_len=max_model_len, max_num_seqs=concurrency, dtype=dtype,
              kv_cache_dtype=kv_cache_dtype, quantization=quantization)
    reqs = random_requests(num_prompts, (32, 256), (NUM_OUTPUT, NUM_OUTPUT), vocab, seed=seed)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUTPUT, ignore_eos=True)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.shutdown()
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny (random-weight Llama), smollm2")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the engine (OMP_NUM_THREADS)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--engine-cores", default="thread,process", help="comma-separated: thread, process")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16"])
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="the server's step budget (default: its own)")
    p.add_argument("--quantization", default=None, choices=["int8"])
    p.add_argument("--output", default=None, help="default: benchmarks/results/server_frontend_t<threads>.json")
    args = p.parse_args()
    args.output = args.output or str(RESULTS / f"server_frontend_t{args.threads}.json")

    rows = []
    for name in args.models.split(","):
        if name == "tiny":  # the tests' tiny Llama (vocab 388)
            model, vocab, max_model_len = server_process.tiny_model(tempfile.mkdtemp(prefix="tiny-llama-")), 300, 512
        else:
            model, vocab, max_model_len = None, 32000, 512
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            num_prompts = max(8, 2 * concurrency)
            ceiling = offline_ceiling(model, vocab, num_prompts, concurrency, args.threads, max_model_len, seed=1,
                                      dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                                      quantization=args.quantization)
            for repeat in range(args.repeats):
                for mode in args.engine_cores.split(","):
                    proc, url = start_server(model, mode, args.threads, max_model_len, args.dtype, args.kv_cache_dtype,
                                             args.max_num_batched_tokens, args.quantization)
                    try:
                        run_serve(bench_args(url, vocab, 2, concurrency, seed=99))  # warm-up
                        report = run_serve(bench_args(url, vocab, num_prompts, concurrency, seed=1))
                    finally:
                        server_process.stop_server(proc)
                    rows.append({"model": name, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
                                 "quantization": args.quantization,
                                 "max_num_batched_tokens": args.max_num_batched_tokens, "engine_core": mode, "concurrency": concurrency, "repeat": repeat,
                                 "num_prompts": num_prompts, "offline_output_tok_s": ceiling, **report})

    header = ("model", "core", "conc", "out tok/s", "% offline", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p99",
              "failed")
    print("\n" + " | ".join(f"{h:>9}" for h in header))
    for r in rows:
        cells = (r["model"], r["engine_core"], r["concurrency"], f"{r['output_throughput']:.1f}",
                 f"{100 * r['output_throughput'] / r['offline_output_tok_s']:.0f}%",
                 f"{r['median_ttft_ms']:.0f} ms", f"{r['p99_ttft_ms']:.0f} ms", f"{r['median_tpot_ms']:.1f} ms",
                 f"{r['p99_itl_ms']:.1f} ms", r["failed"])
        print(" | ".join(f"{c!s:>9}" for c in cells))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"date": datetime.now(timezone.utc).isoformat(), "machine": platform.node(),
                   "cpu_count": os.cpu_count(), "torch_threads": args.threads, "output_len": NUM_OUTPUT,
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
