"""W1 (or W2) on this machine: pagedllm against vLLM (CPU build), llama.cpp and transformers, in one run.

`--workload w2`: one request, 128 prompt tokens, 128 greedy output tokens, 2 threads (issue #18's
single-stream figure; `w2x8`: 8 such requests at once); the table ends with each pagedllm
variant's ratio to llama.cpp. `pagedllm_gguf` runs quantization="gguf" (the GGUF's own blocks).

Every engine gets the same prompts (random token ids), 64 greedy output tokens each with
EOS ignored, all threads, and runs in its own process (vLLM and llama.cpp in their own
virtual environments, which are optional: pass their interpreters or leave them out).
llama.cpp runs twice: `llamacpp` decodes all sequences together (low-level llama_batch API),
`llamacpp_serial` one request at a time (high-level API).
Only generation is timed, after a short warm-up. Prints a table with ratios, writes JSON
and a PNG chart under benchmarks/results/.

Before and after a change, in one run: `--pagedllm-baseline DIR` names another checkout of pagedllm
(e.g. `git worktree add /tmp/before <commit>`), and an engine written `NAME@baseline` (for example
`pagedllm@baseline`, `pagedllm_int8@baseline`) runs NAME from that checkout; the table then ends with
each variant's ratio to its baseline.

    python benchmarks/compare_cpu.py \\
        --vllm-python /path/to/vllm-venv/bin/python --llamacpp-python /path/to/llamacpp-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# engine name -> (runner script under peers/, extra runner flags); other names run peers/run_<name>.py
RUNNERS = {"llamacpp_serial": ("llamacpp", ["--one-at-a-time"]),
           "pagedllm_kvbf16": ("pagedllm", ["--kv-cache-dtype", "bfloat16"]),
           "pagedllm_int8": ("pagedllm", ["--quantization", "int8"]),
           "pagedllm_gguf": ("pagedllm", ["--quantization", "gguf"]),
           "pagedllm_int8_kvbf16": ("pagedllm", ["--quantization", "int8", "--kv-cache-dtype", "bfloat16"]),
           "pagedllm_gguf_act8": ("pagedllm", ["--quantization", "gguf"]),
           "pagedllm_gguf_act15": ("pagedllm", ["--quantization", "gguf"]),
           "pagedllm_gguf_avx2": ("pagedllm", ["--quantization", "gguf"])}
# engine name -> environment it runs with (on top of this process's)
RUNNER_ENV = {"pagedllm_gguf_act8": {"PAGEDLLM_GGUF_ACT_BITS": "8"},  # llama.cpp's q8_1 activations, every layer
              "pagedllm_gguf_act15": {"PAGEDLLM_GGUF_ACT_BITS": "15"},  # 15 bits in every layer (before 2026-12-05)
              "pagedllm_gguf_avx2": {"PAGEDLLM_CPU_ISA": "avx2"}}  # the kernels as built for a CPU without AVX-512


# Workload presets (flags given explicitly override them). W2 is issue #18's single-stream figure.
WORKLOADS = {
    "w1": dict(num_prompts=32, input_min=32, input_max=256, output_len=64, threads=os.cpu_count()),
    "w2": dict(num_prompts=1, input_min=128, input_max=128, output_len=128, threads=2),
    "w2x8": dict(num_prompts=8, input_min=128, input_max=128, output_len=128, threads=2),
}


def build_workload(args: argparse.Namespace, gguf_path: str, path: Path) -> dict:
    from pagedllm.benchmarks.datasets import random_requests
    from pagedllm.model_executor.gguf_loader import load_gguf_config, load_gguf_tokenizer

    vocab = load_gguf_config(gguf_path).vocab_size
    specials = frozenset(load_gguf_tokenizer(gguf_path).all_special_ids)
    reqs = random_requests(args.num_prompts, (args.input_min, args.input_max), (args.output_len, args.output_len),
                           vocab, seed=args.seed, avoid_ids=specials)
    workload = {"prompts": [r.prompt_token_ids for r in reqs], "output_len": args.output_len}
    path.write_text(json.dumps(workload))
    return workload


def hf_checkpoint_from_gguf(gguf_path: str, out_dir: Path) -> Path:
    """The HF-format (safetensors) conversion of the GGUF that vLLM and transformers load."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from pagedllm.model_executor.gguf_loader import load_gguf_config, load_gguf_tokenizer

    config = load_gguf_config(gguf_path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent))
    model.save_pretrained(tmp)
    load_gguf_tokenizer(gguf_path).save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def run_engine(name: str, python: str, model: str, workload: Path, threads: int, dtype: str,
               compile_fused_ops: bool = False, source: Path | None = None, repeats: int = 1) -> dict:
    """One engine in its own process; `source`: another pagedllm checkout to import it from."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    script, flags = RUNNERS.get(name, (name, []))
    cmd = [python, str(HERE / "peers" / f"run_{script}.py"), "--workload", str(workload), "--model", model,
           "--out", str(out), "--threads", str(threads), "--dtype", dtype, "--repeats", str(repeats), *flags]
    if compile_fused_ops and script == "pagedllm":
        cmd.append("--compile-fused-ops")
    # pagedllm from the checkout this script is in (or the baseline's), whatever is installed
    checkout = source if source is not None else HERE.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(HERE / "peers")]),
           "PAGEDLLM_LOGGING_LEVEL": "WARNING", **RUNNER_ENV.get(name, {})}
    if source is not None:  # its own kernel sources: a cache folder of its own, or each side rebuilds the other's
        env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_extensions") + "-baseline"
    label = name + (" (baseline)" if source is not None else "")
    print(f"[compare] running {label} ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f"[compare] {label} failed:\n  " + "\n  ".join(tail), flush=True)
        return {"engine": name, "error": "\n".join(tail)}
    result = json.loads(out.read_text())
    cpu = f", {result['cpu_s']:.1f} s CPU" if "cpu_s" in result else ""
    print(f"[compare] {label}: {result['elapsed_s']:.1f} s generating{cpu} ({time.perf_counter() - start:.0f} s with load)",
          flush=True)
    return result


def ratios_to(results: list[dict], reference: dict | None, key: str, title: str) -> None:
    """Each pagedllm variant's output tok/s over `reference`'s, printed and stored under `key`."""
    if reference is None:
        return
    print(f"\nagainst {title}, {reference.get('engine', reference['engine_key'])} "
          f"({reference['output_tok_s']:.1f} tok/s):")
    for r in results:
        if "output_tok_s" in r and r["engine_key"].startswith("pagedllm"):
            r[key] = r["output_tok_s"] / reference["output_tok_s"]
            print(f"  {r.get('engine', r['engine_key']):<52}{r[key]:>6.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--engines", default="pagedllm,vllm,llamacpp,llamacpp_serial,transformers",
                   help="comma-separated: pagedllm, pagedllm_kvbf16 (a bfloat16 KV cache), pagedllm_int8 "
                        "(quantization='int8': W8A8 linear layers), pagedllm_int8_kvbf16, pagedllm_gguf "
                        "(quantization='gguf': the file's blocks), pagedllm_gguf_act8 / pagedllm_gguf_act15 (the same with every layer's activations at 8 / 15 bits), pagedllm_gguf_avx2 (the same, kernels built with PAGEDLLM_CPU_ISA=avx2), vllm, llamacpp "
                        "(all sequences batched), llamacpp_serial (one request at a time), transformers")
    p.add_argument("--vllm-python", default=os.environ.get("PAGEDLLM_BENCH_VLLM_PYTHON"))
    p.add_argument("--llamacpp-python", default=os.environ.get("PAGEDLLM_BENCH_LLAMACPP_PYTHON"))
    p.add_argument("--workload", default="w1", choices=sorted(WORKLOADS),
                   help="w1: 32 prompts of 32-256 tokens, 64 output tokens; w2: one request of 128 prompt tokens and "
                        "128 output tokens on 2 threads (a person chatting); w2x8: the same, 8 requests at once. "
                        "The flags below override the preset")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--input-min", type=int, default=None)
    p.add_argument("--input-max", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and KV cache of the torch engines (W1 is float32; llama.cpp always reads Q4_1)")
    p.add_argument("--compile-fused-ops", action="store_true",
                   help="pagedllm with torch.compile'd elementwise ops (LLM(compile_fused_ops=True))")
    p.add_argument("--repeats", type=int, default=1,
                   help="pagedllm engines time W1 this many times in their process and report the fastest")
    p.add_argument("--pagedllm-baseline", default=None, metavar="DIR",
                   help="another pagedllm checkout; engines written NAME@baseline run NAME from it")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    for key, value in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    from pagedllm.model_executor.model_source import resolve_model

    gguf = resolve_model(args.model).path
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pagedllm-compare-"))
    workload = build_workload(args, gguf, work / "workload.json")
    in_tokens = sum(len(x) for x in workload["prompts"])
    hf_dir = None
    # interpreters by runner script, so every pagedllm variant in RUNNERS runs in this one
    pythons = {"pagedllm": sys.executable, "transformers": sys.executable, "vllm": args.vllm_python,
               "llamacpp": args.llamacpp_python}
    results = []
    baseline = Path(args.pagedllm_baseline).resolve() if args.pagedllm_baseline else None
    for key in [e.strip() for e in args.engines.split(",") if e.strip()]:
        name, _, variant = key.partition("@")
        if variant and (variant != "baseline" or baseline is None):
            print(f"[compare] skipping {key}: '@baseline' needs --pagedllm-baseline DIR")
            continue
        script = RUNNERS.get(name, (name,))[0]
        if not pythons.get(script):
            print(f"[compare] skipping {key}: pass --{script}-python (its own virtual environment)")
            continue
        model = gguf
        if name in ("vllm", "transformers"):
            hf_dir = hf_dir or hf_checkpoint_from_gguf(gguf, Path(gguf).parent / "hf-float32")
            model = str(hf_dir)
        result = run_engine(name, pythons[script], model, work / "workload.json", args.threads, args.dtype,
                            args.compile_fused_ops, source=baseline if variant else None, repeats=args.repeats)
        result["engine_key"] = key
        if variant and "engine" in result:
            result["engine"] += f" @ {_revision(baseline)}"
        if "elapsed_s" in result:
            result["output_tok_s"] = result["output_tokens"] / result["elapsed_s"]
            result["total_tok_s"] = (in_tokens + result["output_tokens"]) / result["elapsed_s"]
        results.append(result)

    ours = next((r for r in results if r["engine_key"] == "pagedllm" and "output_tok_s" in r), None)
    print()
    print(f"{args.workload.upper()}: {args.num_prompts} prompts, {args.input_min}-{args.input_max} prompt tokens, "
          f"{args.output_len} output tokens, greedy, EOS ignored, {args.dtype}, {args.threads} threads, {platform.node()}")
    print(f"{'engine':<44}{'output tok/s':>14}{'total tok/s':>14}{'pagedllm x':>12}")
    for r in results:
        if "output_tok_s" not in r:
            print(f"{r['engine_key']:<44}{'failed':>14}")
            continue
        ratio = ours["output_tok_s"] / r["output_tok_s"] if ours else float("nan")
        r["pagedllm_ratio"] = ratio
        print(f"{r.get('engine', r['engine_key']):<44}{r['output_tok_s']:>14.1f}{r['total_tok_s']:>14.1f}{ratio:>11.2f}x")

    # Each pagedllm variant against the fastest peer: the figure issue #5's target is stated in.
    peers = [r for r in results if "output_tok_s" in r and not r["engine_key"].startswith("pagedllm")]
    best = max(peers, key=lambda r: r["output_tok_s"], default=None)
    ratios_to(results, best, "ratio_to_best_peer", "the fastest peer")

    # W2's figure: each pagedllm variant against llama.cpp on the same GGUF, in the same run.
    ratios_to(results, max((r for r in peers if r["engine_key"].startswith("llamacpp")),
                           key=lambda r: r["output_tok_s"], default=None), "ratio_to_llamacpp", "llama.cpp")

    # Each variant against the same variant of the baseline checkout, run in the same minutes.
    done = {r["engine_key"]: r for r in results if "output_tok_s" in r}
    pairs = [(r, done[key + "@baseline"]) for key, r in done.items() if key + "@baseline" in done]
    if pairs:
        print(f"\nagainst the baseline checkout ({_revision(baseline)}):")
    for after, before in pairs:
        after["ratio_to_baseline"] = after["output_tok_s"] / before["output_tok_s"]
        print(f"  {after['engine_key']:<52}{after['ratio_to_baseline']:>6.2f}x")

    stamp = datetime.now(timezone.utc)
    record = {
        "date": stamp.isoformat(), "machine": platform.node(), "cpu_count": os.cpu_count(),
        "workload": {k: getattr(args, k) for k in ("workload", "threads", "num_prompts", "input_min", "input_max", "output_len", "seed", "dtype",
                                                   "compile_fused_ops", "repeats")},
        "input_tokens": in_tokens, "results": results,
        "best_peer": best["engine_key"] if best is not None else None,
    }
    name = "compare_cpu" if args.workload == "w1" else f"compare_cpu_{args.workload}"
    out = Path(args.output_json) if args.output_json else RESULTS / f"{name}-{args.dtype}-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    if out.exists() and not args.output_json:  # two runs in one minute: keep both
        out = out.with_name(f"{name}-{args.dtype}-{stamp:%Y%m%d-%H%M%S}-{platform.node()}.json")
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")
    chart(results, out.with_suffix(".png"))
    return 0


def _revision(checkout: Path) -> str:
    """The baseline checkout's commit, for the table."""
    proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or checkout.name


def chart(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart; pip install matplotlib)")
        return
    done = [r for r in results if "output_tok_s" in r]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r.get("engine", r["engine_key"]) for r in done]
    values = [r["output_tok_s"] for r in done]
    bars = ax.barh(names, values, color=["#2a7" if r["engine_key"].startswith("pagedllm") else "#999" for r in done])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xlabel("output tokens/s (W1, higher is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
