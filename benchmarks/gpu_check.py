"""pagedllm on a GPU in one call: correctness against transformers, the Triton kernels, throughput, the floor.

No weights are needed: random-weight models are built from configs (a Qwen3-0.6B-shaped model
and a small Llama) with a word-level tokenizer covering the whole vocabulary
(`gpu_check_reference.py`, which also drives transformers as the reference).

    python benchmarks/gpu_check.py              # everything (estimated: a few minutes on an H100)
    python benchmarks/gpu_check.py --quick      # smaller workloads
    python benchmarks/gpu_check.py --dry-run    # CPU, tiny configs, kernels under TRITON_INTERPRET=1

Sections, each timed and reported on its own (a failure is recorded, the rest still runs):
  env              devices and versions
  floor            device-to-device copy bandwidth and bf16 matmul TFLOP/s
  kernels          Triton attention vs an SDPA reference at model shapes (fp32, bf16, fp16)
  kernel_tests     tests/test_triton_attention.py under pytest, on the real device
  hf_equivalence   greedy output vs transformers: token-exact in fp32, logprobs close in bf16
  attention_bench  decode / prefill kernel time against the floor
  throughput       nano-vllm's protocol (256 requests, prompt and output lengths uniform in
                   100-1024, ignore EOS) on the Qwen3-0.6B shape, and transformers `generate`
Prints a table; writes benchmarks/results/gpu_check-<date>-<device>.json after every section
(and a copy under $OUT when that is set), so a run cut short still leaves its results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller workloads: 64 requests, 16 for transformers, 1 GiB copies")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, kernels under TRITON_INTERPRET=1")
    p.add_argument("--sections", default="env,floor,kernels,kernel_tests,hf_equivalence,attention_bench,throughput")
    p.add_argument("--num-prompts", type=int, default=None, help="throughput requests (default 256; --quick 64)")
    p.add_argument("--max-len", type=int, default=None, help="prompt and output lengths are uniform in 100..this (1024)")
    p.add_argument("--hf-num-prompts", type=int, default=None, help="requests given to transformers (default 64; --quick 16)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_check-<date>-<device>.json)")
    return p.parse_args()


if "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    os.environ.setdefault("PAGEDLLM_ATTENTION_BACKEND", "triton")  # the GPU default; CPU would pick torch

import torch  # noqa: E402
from gpu_check_reference import (  # noqa: E402
    build_models,
    compare_with_hf,
    free_memory,
    hf_generate_throughput,
    sync,
    vocab_size,
)

ARGS = argparse.Namespace()  # set by main()
DEVICE = torch.device("cpu")


def timed(fn, iters: int = 5, warmup: int = 1) -> float:
    """Seconds per call of fn, after warm-up (the first calls compile the Triton kernels)."""
    for _ in range(warmup):
        fn()
    sync(DEVICE)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(DEVICE)
    return (time.perf_counter() - start) / iters


# ----- sections -------------------------------------------------------------------------
def section_env() -> dict:
    import transformers

    from pagedllm.attention.selector import get_attention_backend

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": device_name(), "dry_run": ARGS.dry_run, "quick": ARGS.quick,
            "attention_backend": get_attention_backend(DEVICE).__name__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        info.update(cuda=torch.version.cuda, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    return info


def section_floor() -> dict:
    """What the hardware gives at best: streaming copy bandwidth and dense bf16 matmul throughput."""
    nbytes = (64 << 20) if ARGS.dry_run else (1 << 30) if ARGS.quick else (4 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), iters=3 if ARGS.dry_run else 20)
    copy_gbs = 2 * nbytes / t / 1e9  # each byte read once and written once
    del src, dst
    n = 512 if ARGS.dry_run else 8192
    dtype = torch.float32 if ARGS.dry_run else torch.bfloat16
    a = torch.randn(n, n, dtype=dtype, device=DEVICE)
    b = torch.randn(n, n, dtype=dtype, device=DEVICE)
    t = timed(lambda: a @ b, iters=3 if ARGS.dry_run else 20)
    free_memory(DEVICE)
    return {"copy_GBps": copy_gbs, "copy_bytes": nbytes, "matmul_TFLOPs": 2 * n**3 / t / 1e12,
            "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch.")}


def section_kernels() -> dict:
    """The Triton backend against plain SDPA on model-like shapes, every dtype, both block sizes."""
    from pagedllm.attention.ops import paged_decode, prefix_prefill
    from pagedllm.attention.testing import PagedBatch
    from pagedllm.attention.torch_paged_attention import TorchPagedAttention
    from pagedllm.attention.triton_paged_attention import TritonPagedAttention

    tol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    # (name, heads, kv heads, head_dim, block size)
    shapes = [("qwen3-0.6b", 16, 8, 128, 16), ("llama-gqa3", 12, 4, 64, 32), ("mqa-d80", 8, 1, 80, 16)]
    # (context_len, query_len): decodes first, then a fresh prompt, a prefix-cache hit, a chunk.
    mixed = [(700, 1), (2000, 1), (0, 1), (0, 900), (512, 300), (37, 260)]
    decodes = [(3000, 1), (17, 1), (1024, 1), (511, 1)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    if ARGS.dry_run:  # the interpreter is slow
        mixed = [(40, 1), (90, 1), (0, 1), (0, 60), (32, 20), (37, 15)]
        decodes = [(150, 1), (17, 1), (64, 1), (31, 1)]
        shapes, dtypes = shapes[:2], dtypes[:2]
    rows, ok = [], True
    for name, h, kvh, d, bs in shapes:
        for dtype in dtypes:
            batch = PagedBatch(mixed, h, kvh, d, bs, dtype=dtype, device=DEVICE, seed=1)
            key, value, slots = batch.take_new_kv()
            meta = batch.metadata(slots)
            torch_cache = (batch.k_cache.nan_to_num(0.0), batch.v_cache.nan_to_num(0.0))
            triton_cache = (batch.k_cache, batch.v_cache)
            out = TritonPagedAttention(h, kvh, d, d**-0.5).forward(batch.query, key, value, triton_cache, meta)
            ref = batch.reference()
            err_mixed = (out.float() - ref).abs().max().item()
            reference_backend = TorchPagedAttention(h, kvh, d, d**-0.5).forward(batch.query, key, value, torch_cache, meta)
            err_torch_backend = (reference_backend.float() - ref).abs().max().item()
            same_cache = all(torch.equal(a.nan_to_num(0.0), b) for a, b in zip(triton_cache, torch_cache))
            dec = PagedBatch(decodes, h, kvh, d, bs, dtype=dtype, device=DEVICE, seed=2)
            dref = dec.reference()
            errs_split = {}
            for splits in (1, 4, None):
                o = torch.full_like(dec.query, float("nan"))
                paged_decode(o, dec.query, dec.k_cache, dec.v_cache, dec.block_tables, dec.seq_lens, dec.max_seq_len,
                             d**-0.5, num_splits=splits)
                errs_split[str(splits or "auto")] = (o.float() - dref).abs().max().item()
            pre = PagedBatch([s for s in mixed if s[1] > 1], h, kvh, d, bs, dtype=dtype, device=DEVICE, seed=3)
            o = torch.full_like(pre.query, float("nan"))
            prefix_prefill(o, pre.query, pre.k_cache, pre.v_cache, pre.block_tables, pre.query_start_loc,
                           pre.seq_lens, pre.max_query_len, d**-0.5)
            err_prefill = (o.float() - pre.reference()).abs().max().item()
            errs = [err_mixed, err_prefill, *errs_split.values()]
            passed = same_cache and all(e <= tol[dtype] for e in errs)  # NaN fails too
            ok &= passed
            rows.append({"shape": name, "dtype": str(dtype).removeprefix("torch."), "block_size": bs, "passed": passed,
                         "max_err_mixed_batch": err_mixed, "max_err_prefill": err_prefill,
                         "max_err_decode_by_splits": errs_split, "max_err_torch_backend": err_torch_backend,
                         "cache_writes_match_torch_backend": same_cache})
            log(f"  kernels {name} {rows[-1]['dtype']}: {'ok' if passed else 'FAILED'} (max err {max(errs):.2e})")
            del batch, dec, pre, torch_cache, triton_cache
            free_memory(DEVICE)
    return {"passed": ok, "cases": rows}


def section_kernel_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_triton_attention.py")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    for line in tail[-3:]:
        log(f"  {line}")
    return {"passed": proc.returncode == 0, "returncode": proc.returncode, "summary": tail[-1] if tail else "", "tail": tail}


def section_hf_equivalence(models: dict) -> dict:
    results, ok = {}, True
    prompt_lens = [5, 37, 200, 700] if not ARGS.dry_run else [3, 17, 40]
    max_tokens = 32 if not ARGS.dry_run else 8
    rng = random.Random(1)
    for name, model_dir in models.items():
        vocab = vocab_size(model_dir)
        prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in prompt_lens]
        for dtype in ("float32", "bfloat16"):
            r = compare_with_hf(model_dir, dtype, prompts, max_tokens, DEVICE)
            results[f"{name}/{dtype}"] = r
            ok &= r["passed"]
            log(f"  {name} {dtype}: {'ok' if r['passed'] else 'FAILED'} ({r['summary']})")
    return {"passed": ok, "runs": results}


def section_attention_bench(floor: dict | None) -> dict:
    """The Triton kernels at Qwen3-0.6B's attention shape (16 heads, 8 KV heads, head_dim 128, bf16)."""
    from pagedllm.attention.ops import paged_decode, prefix_prefill
    from pagedllm.attention.testing import PagedBatch

    h, kvh, d, bs = 16, 8, 128, 16
    dtype = torch.float32 if ARGS.dry_run else torch.bfloat16
    elem = torch.empty((), dtype=dtype).element_size()
    out = {}
    n_dec, ctx = (4, 64) if ARGS.dry_run else (64, 512) if ARGS.quick else (256, 1024)
    for label, num in (("decode_batch", n_dec), ("decode_single", 1)):
        dec = PagedBatch([(ctx * (4 if num == 1 else 1), 1)] * num, h, kvh, d, bs, dtype=dtype, device=DEVICE, fill=0.0)
        o = torch.empty_like(dec.query)
        t = timed(lambda: paged_decode(o, dec.query, dec.k_cache, dec.v_cache, dec.block_tables, dec.seq_lens,
                                       dec.max_seq_len, d**-0.5), iters=2 if ARGS.dry_run else 20)
        kv_bytes = 2 * sum(c + 1 for c, _ in dec.seqs) * kvh * d * elem
        out[label] = {"seqs": num, "context": dec.max_seq_len, "ms": t * 1e3, "kv_GBps": kv_bytes / t / 1e9}
        if floor and floor.get("copy_GBps"):
            out[label]["fraction_of_copy_bw"] = out[label]["kv_GBps"] / floor["copy_GBps"]
        log(f"  {label}: {t * 1e3:.3f} ms, {out[label]['kv_GBps']:.0f} GB/s of K/V")
        del dec
    n_pre, plen = (2, 64) if ARGS.dry_run else (4, 1024) if ARGS.quick else (8, 2048)
    pre = PagedBatch([(0, plen)] * n_pre, h, kvh, d, bs, dtype=dtype, device=DEVICE, fill=0.0)
    o = torch.empty_like(pre.query)
    t = timed(lambda: prefix_prefill(o, pre.query, pre.k_cache, pre.v_cache, pre.block_tables, pre.query_start_loc,
                                     pre.seq_lens, pre.max_query_len, d**-0.5), iters=2 if ARGS.dry_run else 10)
    flops = n_pre * 4 * h * d * plen * plen / 2  # QK^T and PV, causal half
    out["prefill"] = {"seqs": n_pre, "prompt_len": plen, "ms": t * 1e3, "TFLOPs": flops / t / 1e12}
    if floor and floor.get("matmul_TFLOPs"):
        out["prefill"]["fraction_of_matmul"] = out["prefill"]["TFLOPs"] / floor["matmul_TFLOPs"]
    log(f"  prefill: {t * 1e3:.3f} ms, {out['prefill']['TFLOPs']:.1f} TFLOP/s")
    free_memory(DEVICE)
    return out


def section_throughput(model_dir: str, floor: dict | None) -> dict:
    from pagedllm import LLM, SamplingParams

    num = ARGS.num_prompts or (8 if ARGS.dry_run else 64 if ARGS.quick else 256)
    hi = ARGS.max_len or (32 if ARGS.dry_run else 1024)
    lo = min(100, hi)
    # nano-vllm's bench.py: ids uniform in 0..10000, lengths uniform in [100, max_len], temperature 0.6.
    top_id = min(10000, vocab_size(model_dir) - 1)
    rng = random.Random(0)
    prompts = [[rng.randint(0, top_id) for _ in range(rng.randint(lo, hi))] for _ in range(num)]
    out_lens = [rng.randint(lo, hi) for _ in range(num)]
    hf_num = min(num, ARGS.hf_num_prompts or (4 if ARGS.dry_run else 16 if ARGS.quick else 64))
    result = {"num_prompts": num, "len_range": [lo, hi], "prompt_tokens": sum(map(len, prompts)),
              "output_tokens": sum(out_lens)}

    dtype = "float32" if ARGS.dry_run else "bfloat16"
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=2 * hi + 16, seed=0)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in out_lens]
    # Warm-up compiles the kernels' variants: a small batch of long prompts (decode splits) and a wide one.
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    llm.generate([{"prompt_token_ids": p[:50]} for p in prompts], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    llm.reset_prefix_cache()
    log(f"  pagedllm: {num} requests, {result['prompt_tokens']} prompt + {result['output_tokens']} output tokens")
    for label, count in (("pagedllm", num), ("pagedllm_hf_subset", hf_num)):
        llm.reset_prefix_cache()
        sync(DEVICE)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:count]], params[:count], use_tqdm=False)
        sync(DEVICE)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        result[label] = {"requests": count, "elapsed_s": elapsed, "output_tokens": generated,
                         "output_tok_s": generated / elapsed,
                         "total_tok_s": (generated + sum(map(len, prompts[:count]))) / elapsed}
        log(f"  {label}: {generated / elapsed:.0f} output tok/s ({elapsed:.1f} s)")
    llm.shutdown()
    del llm
    free_memory(DEVICE)

    hf = hf_generate_throughput(model_dir, prompts[:hf_num], out_lens[:hf_num], dtype, DEVICE, ARGS.hf_batch_size)
    result["transformers_hf_subset"] = hf
    log(f"  transformers: {hf['output_tok_s']:.0f} output tok/s on {hf_num} requests ({hf['elapsed_s']:.1f} s)")
    result["speedup_vs_transformers_same_requests"] = (
        result["pagedllm_hf_subset"]["output_tok_s"] / hf["output_tok_s"])
    if floor:
        result["floor"] = roofline_floor(model_dir, prompts, out_lens, floor, dtype)
        result["fraction_of_floor"] = result["floor"]["seconds"] / result["pagedllm"]["elapsed_s"]
    return result


def roofline_floor(model_dir: str, prompts: list[list[int]], out_lens: list[int], floor: dict, dtype: str) -> dict:
    """A lower bound on the benchmark's time from the measured floor.

    Compute: 2 FLOPs per parameter per token plus causal attention, at the matmul rate.
    Memory: the weights once per decode step (at least max(out_lens) steps) plus every
    token's K/V context once per generated token, at the copy bandwidth.
    """
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    layers, hidden, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    inter = cfg["intermediate_size"]
    elem = 4 if dtype == "float32" else 2
    params = layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter)
    params += vocab * hidden  # the LM head (tied or not, it is read and multiplied)
    tokens = sum(map(len, prompts)) + sum(out_lens)
    # attention: each token attends to its average context; 4 * heads * head_dim FLOPs per (query, key)
    contexts = sum(sum(range(len(p) + n)) for p, n in zip(prompts, out_lens))
    flops = 2 * params * tokens + 4 * heads * head_dim * layers * contexts
    kv_per_token = 2 * layers * kv_heads * head_dim * elem
    decode_kv = sum(sum(range(len(p), len(p) + n)) for p, n in zip(prompts, out_lens)) * kv_per_token
    weight_bytes = params * elem * max(out_lens)
    compute_s = flops / (floor["matmul_TFLOPs"] * 1e12)
    memory_s = (weight_bytes + decode_kv) / (floor["copy_GBps"] * 1e9)
    return {"seconds": max(compute_s, memory_s), "compute_s": compute_s, "memory_s": memory_s,
            "params": params, "flops": flops}


# ----- driver ----------------------------------------------------------------------------
def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu-dryrun-{platform.node()}"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def main() -> None:
    global ARGS, DEVICE
    ARGS = parse_args()
    DEVICE = torch.device("cpu" if ARGS.dry_run else "cuda")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --dry-run to exercise the script on CPU")
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 on both sides of the comparison
    wanted = [s.strip() for s in ARGS.sections.split(",") if s.strip()]
    stamp = datetime.now(timezone.utc)
    path = Path(ARGS.out) if ARGS.out else RESULTS / f"gpu_check-{stamp:%Y%m%d-%H%M}-{slug(device_name())}.json"
    report = {"date": stamp.isoformat(), "device": device_name(), "args": vars(ARGS), "sections": {}}
    workdir = Path(tempfile.mkdtemp(prefix="pagedllm-gpu-check-"))
    models: dict[str, str] | None = None

    def run(name: str, fn) -> dict | None:
        if name not in wanted:
            return None
        log(f"== {name}")
        start = time.perf_counter()
        entry: dict = {}
        try:
            entry["result"] = fn()
            entry["ok"] = entry["result"].get("passed", True) if isinstance(entry["result"], dict) else True
        except Exception as e:  # one failed section must not cost the others
            entry.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            log(f"  FAILED: {entry['error']}")
            free_memory(DEVICE)
        entry["seconds"] = time.perf_counter() - start
        report["sections"][name] = entry
        write_report(report, path)
        return entry.get("result")

    def need_models() -> dict[str, str]:
        nonlocal models
        if models is None:
            models = build_models(workdir, DEVICE, tiny=ARGS.dry_run)
            for name, path in models.items():
                log(f"  built {name} at {path}")
        return models

    run("env", section_env)
    floor = run("floor", section_floor)
    run("kernels", section_kernels)
    run("kernel_tests", section_kernel_tests)
    run("hf_equivalence", lambda: section_hf_equivalence(need_models()))
    run("attention_bench", lambda: section_attention_bench(floor))
    run("throughput", lambda: section_throughput(next(iter(need_models().values())), floor))
    print_table(report)
    log(f"wrote {path}")


def write_report(report: dict, path: Path) -> None:
    text = json.dumps(report, indent=2, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / path.name).write_text(text)


def print_table(report: dict) -> None:
    rows = []
    for name, entry in report["sections"].items():
        status = "ok" if entry.get("ok") else "FAILED"
        rows.append((name, status, f"{entry['seconds']:.1f}s", headline(name, entry)))
    widths = [max(len(r[i]) for r in rows + [("section", "status", "time", "")]) for i in range(3)]
    print()
    print(f"{'section':<{widths[0]}}  {'status':<{widths[1]}}  {'time':>{widths[2]}}  result")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")


def headline(name: str, entry: dict) -> str:
    r = entry.get("result")
    if r is None:
        return entry.get("error", "")
    try:
        if name == "env":
            return (f"{r['device']}, {r['attention_backend']}, torch {r['torch']}, triton {r['triton']}, "
                    f"transformers {r['transformers']}")
        if name == "floor":
            return f"copy {r['copy_GBps']:.0f} GB/s, {r['matmul_dtype']} matmul {r['matmul_TFLOPs']:.1f} TFLOP/s"
        if name == "kernels":
            worst = max(max(c["max_err_mixed_batch"], c["max_err_prefill"], *c["max_err_decode_by_splits"].values())
                        for c in r["cases"])
            return f"{sum(c['passed'] for c in r['cases'])}/{len(r['cases'])} cases pass, worst max err {worst:.1e}"
        if name == "kernel_tests":
            return r["summary"]
        if name == "hf_equivalence":
            return "; ".join(f"{k}: {v['summary']}" for k, v in r["runs"].items())
        if name == "attention_bench":
            return (f"decode {r['decode_batch']['kv_GBps']:.0f} GB/s (batch), {r['decode_single']['kv_GBps']:.0f} GB/s "
                    f"(1 seq); prefill {r['prefill']['TFLOPs']:.1f} TFLOP/s")
        if name == "throughput":
            text = (f"pagedllm {r['pagedllm']['output_tok_s']:.0f} out tok/s ({r['num_prompts']} req); "
                    f"same {r['transformers_hf_subset']['requests']} req: pagedllm "
                    f"{r['pagedllm_hf_subset']['output_tok_s']:.0f} vs transformers "
                    f"{r['transformers_hf_subset']['output_tok_s']:.0f} "
                    f"(x{r['speedup_vs_transformers_same_requests']:.1f})")
            if "fraction_of_floor" in r:
                text += f"; floor {r['floor']['seconds']:.1f}s = {100 * r['fraction_of_floor']:.0f}% of elapsed"
            return text
    except (KeyError, TypeError, ValueError):
        pass
    return ""


if __name__ == "__main__":
    main()
