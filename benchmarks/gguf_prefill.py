"""W2's prefill alone: one 128-token prompt through SmolLM2-135M's Q4_1 GGUF, per quantization.

Each variant runs in its own process (the model loaded, two warm-up prefills, then `--calls`
timed prefills of one output token each, prefix cache reset between them; the best is kept), and
the variants are interleaved over `--rounds` so the machine's load falls on all alike. A variant
is a quantization (`gguf`, `int8`, `none` = float32), or `gguf@DIR`: the same from another pagedllm
checkout (before and after a kernel change; its CPU kernels build into their own cache folder).
Prints milliseconds per prefill (wall and the process's CPU time) and writes JSON under
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
REPO = Path(__file__).resolve().parent.parent


def child(quantization: str | None, threads: int, calls: int, prompt_len: int) -> None:
    """Runs in the variant's process: prints one JSON line of its timings."""
    import torch

    torch.set_num_threads(threads)
    from pagedllm import LLM, SamplingParams

    llm = LLM(model=None, max_model_len=512, quantization=quantization, disable_log_stats=True)
    prompt = [{"prompt_token_ids": list(range(1000, 1000 + prompt_len))}]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    wall, cpu = [], []
    for i in range(calls + 2):
        llm.reset_prefix_cache()
        w0, c0 = time.perf_counter(), time.process_time()
        llm.generate(prompt, one, use_tqdm=False)
        if i >= 2:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    llm.shutdown()
    print(json.dumps({"wall_ms": [w * 1e3 for w in wall], "cpu_ms": [c * 1e3 for c in cpu]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="gguf,int8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(None if args.child == "none" else args.child, args.threads, args.calls, args.prompt_len)
        return
    variants = args.variants.split(",")
    best: dict[str, dict[str, float]] = {v: {"wall_ms": float("inf"), "cpu_ms": float("inf")} for v in variants}
    loads = []
    for _ in range(args.rounds):
        for v in variants:
            quant, _, checkout = v.partition("@")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            root = Path(checkout).resolve() if checkout else REPO
            env["PYTHONPATH"] = str(root)
            if checkout:  # its own kernel sources: never share (and rebuild) this checkout's cache
                env["TORCH_EXTENSIONS_DIR"] = env.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext") + "-baseline"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", quant, "--threads", str(args.threads),
                   "--calls", str(args.calls), "--prompt-len", str(args.prompt_len)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            loads.append(os.getloadavg()[0])
            for key in ("wall_ms", "cpu_ms"):
                best[v][key] = min(best[v][key], min(got[key]))
    print(f"{args.prompt_len}-token prefill, {args.threads} thread(s), best of {args.rounds} x {args.calls}; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    ref = best[variants[-1]]["wall_ms"]
    for v in variants:
        print(f"  {v:<40} {best[v]['wall_ms']:8.1f} ms wall {best[v]['cpu_ms']:8.1f} ms CPU  "
              f"{best[v]['wall_ms'] / ref:5.2f}x of {variants[-1]}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"gguf_prefill-{datetime.now(timezone.utc):%Y%m%d-%H%M}-vm.json"
    path.write_text(json.dumps(dict(benchmark="gguf_prefill", threads=args.threads, prompt_len=args.prompt_len,
                                    calls=args.calls, rounds=args.rounds, load_averages=loads,
                                    machine=platform.processor() or platform.machine(), best=best), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
