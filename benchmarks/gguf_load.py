"""How long `LLM(model=a .gguf)` takes and how much memory it leaves resident, per phase.

The issue's figure is Qwen2.5-0.5B-Instruct Q4_K_M (491 MB), which loaded in 23 s as 2.5 GB of
float32. No model hub here, so the file is written once (cached under `--cache-dir`) with that
model's real shapes (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864, vocabulary
151936 with ~150k BPE merges, QKV biases, an untied `output.weight`) and llama.cpp's Q4_K_M type
rules, blocks random but valid (`tests/gguf_utils.write_random_qwen2_gguf`). As in the real file,
a row of 896 weights is not a whole 256-weight super-block, so llama.cpp's fallback turns every
896-column Q4_K into Q5_0 and Q6_K into Q8_0: only ffn_down (4864 columns) is Q4_K / Q6_K.

Each load runs in a fresh process (nothing cached, libraries imported before the clock starts),
timed by phase with wrappers around the loader's functions:

  config      the GGUF metadata -> transformers config (`gguf_loader._cached_config`)
  tokenizer   the vocabulary -> a fast tokenizer (`gguf_loader.load_gguf_tokenizer`)
  reader      opening the file for its tensors (`gguf_loader._open_reader`)
  decode      blocks -> the kernel's form, or dequantised floats (`gguf_blocks.decode`, `gguf.dequantize`)
  model       the rest of `load_model`: building the model, copying weights in, after-loading steps
  kv_cache    sizing and allocating the KV cache (`EngineCore._initialize_kv_cache`)
  other       the rest of `LLM()` (engine arguments, processes, the kernels' import)
  first_token a 16-token prompt and one output token, after `LLM()` returns

Memory: process RSS after `LLM()` minus before it (after imports), against the file size plus
the KV cache's bytes; "warm" is the same in a process whose engine already ran once on a tiny
model, so the one-off costs of a first engine (libraries, the kernels' module, thread pools)
are left out and what remains is the model's (weights, tokenizer, what the load left allocated).

    python benchmarks/gguf_load.py                       # Qwen2.5-0.5B-shaped, gguf and float32
    python benchmarks/gguf_load.py --smollm2             # also the SmolLM2-135M Q4_1 file

Prints a table, writes JSON under benchmarks/results/.
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "tests"))

KV_BYTES = 64 << 20
PHASES = ("config", "tokenizer", "reader", "decode", "model", "kv_cache", "other")


def qwen_file(cache_dir: Path) -> Path:
    """The Qwen2.5-0.5B-shaped Q4_K_M file, written the first time (about 20 s)."""
    from gguf_utils import write_random_qwen2_gguf

    path = cache_dir / "qwen2.5-0.5b-shaped-random.Q4_K_M.gguf"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_random_qwen2_gguf(str(tmp))
        tmp.rename(path)
    return path


def smollm2_file() -> Path:
    from pagedllm.model_executor.model_source import resolve_model

    return Path(resolve_model(None).path)  # the default model


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def warm_child(path: str, quantization: str | None, threads: int, tiny: str) -> dict:
    """RSS growth of a load in a process whose engine already ran once (on a tiny model): the
    model's own memory, without the one-off costs of a first engine (libraries, kernels, pools)."""
    import gc

    import torch

    torch.set_num_threads(threads)
    from pagedllm import LLM

    LLM(model=tiny, quantization=quantization, max_model_len=128, kv_cache_memory_bytes=8 << 20).shutdown()
    gc.collect()
    before = _rss()
    llm = LLM(model=path, quantization=quantization, max_model_len=1024, kv_cache_memory_bytes=KV_BYTES)
    after = _rss()
    llm.shutdown()
    return {"rss_delta_warm": after["VmRSS"] - before["VmRSS"]}


def child(path: str, quantization: str | None, threads: int) -> dict:
    """One load in this (fresh) process; returns its phases and memory."""
    import torch

    torch.set_num_threads(threads)
    import gguf

    from pagedllm import LLM, SamplingParams
    from pagedllm.engine import engine_core
    from pagedllm.model_executor import gguf_loader
    from pagedllm.model_executor.layers.quantization import gguf_blocks
    from pagedllm.worker import model_runner

    spent = dict.fromkeys(PHASES, 0.0)

    def timed(phase: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - start
        return wrapper

    gguf_loader._cached_config = timed("config", gguf_loader._cached_config)
    gguf_loader.load_gguf_tokenizer = timed("tokenizer", gguf_loader.load_gguf_tokenizer)
    gguf_loader._open_reader = timed("reader", gguf_loader._open_reader)
    gguf_blocks.decode = timed("decode", gguf_blocks.decode)
    gguf.dequantize = timed("decode", gguf.dequantize)
    model_runner.load_model = timed("model", model_runner.load_model)
    engine_core.EngineCore._initialize_kv_cache = timed("kv_cache", engine_core.EngineCore._initialize_kv_cache)

    before = _rss()
    start = time.perf_counter()
    llm = LLM(model=path, quantization=quantization, max_model_len=1024, kv_cache_memory_bytes=KV_BYTES)
    total = time.perf_counter() - start
    after = _rss()
    # the reader and the decode run inside load_model: what is left of it is building and copying in
    spent["model"] -= spent["reader"] + spent["decode"]
    spent["other"] = total - sum(spent[p] for p in PHASES if p != "other")
    start = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": list(range(100, 116))}], SamplingParams(temperature=0, max_tokens=1),
                       use_tqdm=False)
    first_token = time.perf_counter() - start
    runner = llm.llm_engine.engine_core.core.model_executor.model_runner
    kv_bytes = sum(t.numel() * t.element_size() for layer in runner.kv_caches
                   for t in (layer if isinstance(layer, (list, tuple)) else [layer]))
    logprob_ok = bool(out[0].outputs[0].token_ids)
    llm.shutdown()
    file_bytes = os.path.getsize(path)
    rss_delta = after["VmRSS"] - before["VmRSS"]
    return {
        "file": os.path.basename(path), "file_bytes": file_bytes, "quantization": quantization or "none",
        "threads": threads, "load_s": total, "phases_s": spent, "first_token_s": first_token,
        "kv_cache_bytes": kv_bytes, "rss_before": before, "rss_after": after, "rss_delta": rss_delta,
        "anon_delta": after["RssAnon"] - before["RssAnon"], "file_backed_delta": after["RssFile"] - before["RssFile"],
        "rss_ratio": rss_delta / (file_bytes + kv_bytes), "generated": logprob_ok,
    }


def run_child(path: Path, quantization: str, threads: int, tiny: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    extra = ["--warm", str(tiny)] if tiny else []
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), quantization, "--threads", str(threads),
                           *extra], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"load of {path} ({quantization}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("PAGEDLLM_CACHE_DIR", Path.home() / ".cache" / "pagedllm")) / "bench")
    parser.add_argument("--quantization", default="gguf,none", help="comma-separated; 'none' is the float32 path")
    parser.add_argument("--smollm2", action="store_true", help="also the SmolLM2-135M-Instruct Q4_1 file")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved; the fastest load of each counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "QUANTIZATION"), help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, quantization = args.child
        quantization = None if quantization == "none" else quantization
        result = warm_child(path, quantization, args.threads, args.warm) if args.warm else \
            child(path, quantization, args.threads)
        print(json.dumps(result))
        return

    files = [qwen_file(args.cache_dir)] + ([smollm2_file()] if args.smollm2 else [])
    runs = [(f, q) for f in files for q in args.quantization.split(",")]
    best: dict[tuple[Path, str], dict] = {}
    for _ in range(args.repeats):
        for f, q in runs:
            result = run_child(f, q, args.threads)
            if (f, q) not in best or result["load_s"] < best[(f, q)]["load_s"]:
                best[(f, q)] = result
    tiny = args.cache_dir / "tiny-qwen2.gguf"
    if not tiny.exists():
        from test_gguf_loader import write_tiny_gguf

        write_tiny_gguf(tiny, "qwen2", True)
    for f, q in runs:
        r = best[(f, q)]
        r.update(run_child(f, q, args.threads, tiny))
        r["rss_ratio_warm"] = r["rss_delta_warm"] / (r["file_bytes"] + r["kv_cache_bytes"])
    load = os.getloadavg()
    print(f"load average {load[0]:.1f}, {args.threads} threads, best of {args.repeats}")
    header = f"{'file':<42} {'quant':<5} {'load s':>7} " + " ".join(f"{p:>9}" for p in PHASES)
    print(header + f" {'1st tok':>7} {'MiB file':>8} {'MiB KV':>6} {'MiB RSS+':>8} {'ratio':>5} {'warm':>6} {'ratio':>5}")
    for (f, q), r in best.items():
        print(f"{r['file'][:42]:<42} {q:<5} {r['load_s']:>7.2f} "
              + " ".join(f"{r['phases_s'][p]:>9.2f}" for p in PHASES)
              + f" {r['first_token_s']:>7.2f} {r['file_bytes'] / 2**20:>8.0f} {r['kv_cache_bytes'] / 2**20:>6.0f}"
              f" {r['rss_delta'] / 2**20:>8.0f} {r['rss_ratio']:>5.2f}"
              f" {r['rss_delta_warm'] / 2**20:>6.0f} {r['rss_ratio_warm']:>5.2f}")
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gguf_load-{stamp:%Y%m%d-%H%M}{'-' + args.tag if args.tag else ''}-{platform.node()}.json"
    out.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "load_average": load,
                               "threads": args.threads, "repeats": args.repeats, "results": list(best.values())},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
