"""The sections of `gpu_check.py`: what each one runs and what it reports.

Every section takes the shared `Context` and returns a JSON-able dict (`passed` when it checks
something). The Qwen3-0.6B-shaped bf16 engine is built once and shared by the throughput,
cuda_graphs, sync_audit and profile sections, then shut down before transformers runs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from gpu_check_reference import (
    build_models,
    compare_with_hf,
    free_memory,
    hf_generate_batch_throughput,
    hf_generate_throughput,
    sync,
    vocab_size,
)

ROOT = Path(__file__).resolve().parent.parent
BIG = "qwen3-0.6b-shape"


@dataclass
class Context:
    args: Any
    device: torch.device
    log: Callable[[str], None]
    workdir: Path
    out_dir: Path
    stamp: str
    results: dict = field(default_factory=dict)
    models: dict | None = None
    engine: Any = None  # the shared pagedllm LLM on the big model
    workload: dict | None = None

    def timed(self, fn, iters: int = 5, warmup: int = 1) -> float:
        """Seconds per call of fn, after warm-up (the first calls compile the Triton kernels)."""
        for _ in range(warmup):
            fn()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(self.device)
        return (time.perf_counter() - start) / iters

    def need_models(self) -> dict[str, str]:
        if self.models is None:
            self.models = build_models(self.workdir, self.device, tiny=self.args.dry_run)
            self.log(f"  built {', '.join(self.models)} under {self.workdir}")
        return self.models

    @property
    def big_model(self) -> str:
        models = self.need_models()
        return models.get(BIG) or models["qwen3-tiny"]

    @property
    def dtype(self) -> str:
        return "float32" if self.args.dry_run else "bfloat16"

    def need_workload(self) -> dict:
        """nano-vllm's bench.py: ids uniform in 0..10000, lengths uniform in [100, max_len]."""
        if self.workload is None:
            a = self.args
            num = a.num_prompts or (8 if a.dry_run else 256)
            hi = a.max_len or (32 if a.dry_run else 1024)
            lo = min(100, hi)
            top_id = min(10000, vocab_size(self.big_model) - 1)
            rng = random.Random(0)
            prompts = [[rng.randint(0, top_id) for _ in range(rng.randint(lo, hi))] for _ in range(num)]
            out_lens = [rng.randint(lo, hi) for _ in range(num)]
            hf_num = min(num, a.hf_num_prompts or (4 if a.dry_run else 32 if a.quick else 64))
            self.workload = {"prompts": prompts, "out_lens": out_lens, "lo": lo, "hi": hi, "hf_num": hf_num}
        return self.workload

    def need_engine(self):
        if self.engine is None:
            from pagedllm import LLM

            hi = self.need_workload()["hi"]
            self.engine = LLM(model=self.big_model, dtype=self.dtype, max_model_len=2 * hi + 16, seed=0)
        return self.engine

    def close_engine(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        free_memory(self.device)


# ----- correctness against transformers -----------------------------------------------------------
def section_hf_equivalence(ctx: Context) -> dict:
    """Each model against transformers, with every engine setting that changes the GPU path."""
    models = ctx.need_models()
    fp32_engines = {"triton+graphs": dict(backend="triton", enforce_eager=False),
                    "triton eager": dict(backend="triton", enforce_eager=True),
                    "torch eager": dict(backend="torch", enforce_eager=True)}
    bf16_engines = {"triton+graphs": dict(backend="triton", enforce_eager=False),
                    "torch eager": dict(backend="torch", enforce_eager=True)}
    plan = {name: (fp32_engines, bf16_engines) for name in models}
    if ctx.args.quick:  # every setting on the Qwen3-0.6B shape; the others with graphs, the tiny Qwen2 for its family
        graphs_only = {"triton+graphs": fp32_engines["triton+graphs"]}
        plan = {BIG: plan[BIG], "llama-small": (graphs_only, graphs_only),
                "qwen2-tiny": ({k: fp32_engines[k] for k in ("triton+graphs", "torch eager")}, {})}
    if ctx.args.dry_run:  # CPU: no graphs; the interpreter is slow
        triton_only = {"triton": fp32_engines["triton eager"]}
        plan = {name: ({**triton_only, "torch eager": fp32_engines["torch eager"]}, triton_only) for name in models}
    prompt_lens = [3, 17, 40] if ctx.args.dry_run else [5, 37, 200, 700]
    max_tokens = 8 if ctx.args.dry_run else 32
    rng = random.Random(1)
    results, ok = {}, True
    for name, (fp32, bf16) in plan.items():
        model_dir = models[name]
        vocab = vocab_size(model_dir)
        prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in prompt_lens]
        for dtype, engines in (("float32", fp32), ("bfloat16", bf16)):
            if not engines:
                continue
            for engine, r in compare_with_hf(model_dir, dtype, prompts, max_tokens, ctx.device, engines).items():
                results[f"{name}/{dtype}/{engine}"] = r
                ok &= r["passed"]
                ctx.log(f"  {name} {dtype} {engine}: {'ok' if r['passed'] else 'FAILED'} ({r['summary']})")
    return {"passed": ok, "runs": results}


# ----- throughput ------------------------------------------------------------------------------
class StepTimer:
    """Wall time per engine stage, by wrapping the engine's own methods for one run."""

    def __init__(self, engine) -> None:
        self.engine, self.totals, self.steps = engine, Counter(), 0
        self.originals = {}
        for owner, name in ((engine.engine_core.core.scheduler, "schedule"), (engine.model_runner, "execute_model"),
                            (engine.engine_core.core.scheduler, "update_from_output"), (engine, "step")):
            original = getattr(owner, name)
            self.originals[(owner, name)] = original
            setattr(owner, name, self._timed(name, original))

    def _timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - start
                self.steps += name == "step"
        return wrapper

    def restore(self) -> dict:
        for (owner, name) in self.originals:
            delattr(owner, name)  # back to the class's method
        step = self.totals["step"]
        other = step - self.totals["schedule"] - self.totals["execute_model"] - self.totals["update_from_output"]
        return {"steps": self.steps, "step_s": step, "schedule_s": self.totals["schedule"],
                "execute_model_s": self.totals["execute_model"], "update_from_output_s": self.totals["update_from_output"],
                "output_processing_s": other, "ms_per_step": 1e3 * step / max(1, self.steps)}


def generate_timed(llm, prompts: list[list[int]], params: list, device: torch.device, breakdown: bool = False) -> dict:
    llm.reset_prefix_cache()
    timer = StepTimer(llm.llm_engine) if breakdown else None
    sync(device)
    start = time.perf_counter()
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        stages = timer.restore() if timer else None
    sync(device)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"requests": len(prompts), "elapsed_s": elapsed, "output_tokens": generated,
              "output_tok_s": generated / elapsed, "total_tok_s": (generated + sum(map(len, prompts))) / elapsed}
    if stages:
        result["stages"] = stages
    return result


def section_throughput(ctx: Context) -> dict:
    from pagedllm import SamplingParams

    w = ctx.need_workload()
    prompts, out_lens, hf_num = w["prompts"], w["out_lens"], w["hf_num"]
    llm = ctx.need_engine()
    runner = llm.llm_engine.model_runner
    worker = llm.llm_engine.engine_core.core.model_executor.worker
    result = {"num_prompts": len(prompts), "len_range": [w["lo"], w["hi"]], "prompt_tokens": sum(map(len, prompts)),
              "output_tokens": sum(out_lens), "dtype": ctx.dtype, "num_kv_blocks": runner.num_blocks,
              "memory_profile": vars(worker.memory_profile) if worker.memory_profile else None,
              "cuda_graphs": None if runner.cuda_graphs is None else {
                  "sizes": runner.graph_sizes, "capture_s": runner.cuda_graphs.capture_seconds,
                  "capture_bytes": runner.cuda_graphs.capture_bytes}}
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in out_lens]
    # Warm-up: every kernel variant compiles (a few long prompts for the decode splits, then a wide batch).
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], warm, use_tqdm=False)
    llm.generate([{"prompt_token_ids": p[:50]} for p in prompts], warm, use_tqdm=False)
    ctx.log(f"  pagedllm: {len(prompts)} requests, {result['prompt_tokens']} prompt + {result['output_tokens']} "
            "output tokens")
    result["pagedllm"] = generate_timed(llm, prompts, params, ctx.device, breakdown=True)
    ctx.log(f"  pagedllm: {result['pagedllm']['output_tok_s']:.0f} output tok/s ({result['pagedllm']['elapsed_s']:.1f} s)"
            f", {result['pagedllm']['stages']['ms_per_step']:.2f} ms/step")
    result["pagedllm_hf_subset"] = generate_timed(llm, prompts[:hf_num], params[:hf_num], ctx.device)
    floor = ctx.results.get("floor")
    if floor:
        result["floor"] = roofline_floor(ctx.big_model, prompts, out_lens, floor, ctx.dtype)
        result["fraction_of_floor"] = result["floor"]["seconds"] / result["pagedllm"]["elapsed_s"]
    return result


def roofline_floor(model_dir: str, prompts: list[list[int]], out_lens: list[int], floor: dict, dtype: str) -> dict:
    """A lower bound on the benchmark's time from the measured floor.

    Compute: 2 FLOPs per parameter per token through the layers, the LM head for generated tokens
    only, plus causal attention, at the matmul rate. Memory: the weights once per decode step (at
    least max(out_lens) steps) plus every token's K/V context once per generated token, at the
    copy bandwidth.
    """
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    layers, hidden, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    inter = cfg["intermediate_size"]
    elem = 4 if dtype == "float32" else 2
    body = layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter)
    head = vocab * hidden  # tied or not, it is read and multiplied
    tokens, outputs = sum(map(len, prompts)) + sum(out_lens), sum(out_lens)
    contexts = sum(sum(range(len(p) + n)) for p, n in zip(prompts, out_lens))  # (query, key) pairs
    flops = 2 * body * tokens + 2 * head * outputs + 4 * heads * head_dim * layers * contexts
    kv_per_token = 2 * layers * kv_heads * head_dim * elem
    decode_kv = sum(sum(range(len(p), len(p) + n)) for p, n in zip(prompts, out_lens)) * kv_per_token
    weight_bytes = (body + head) * elem * max(out_lens)
    compute_s = flops / (floor["matmul_TFLOPs"] * 1e12)
    memory_s = (weight_bytes + decode_kv) / (floor["copy_GBps"] * 1e9)
    return {"seconds": max(compute_s, memory_s), "compute_s": compute_s, "memory_s": memory_s,
            "params": body + head, "flops": flops}


# ----- CUDA graphs, host syncs, profile ----------------------------------------------------------------
def decode_batch(runner, n: int, context: int, first_block: int = 0):
    """n decodes at position `context`, each over its own run of blocks from `first_block`."""
    from pagedllm.scheduler_output import ScheduledRequest, SchedulerOutput
    from pagedllm.sampling_params import SamplingParams

    per_seq = -(-(context + 1) // runner.block_size)
    params = SamplingParams(temperature=0.0)
    reqs = [ScheduledRequest(f"d{i}", [7 + i], context, list(range(first_block + i * per_seq,
                                                                     first_block + (i + 1) * per_seq)),
                             params, [1] * context, [], True) for i in range(n)]
    return SchedulerOutput(reqs, n), per_seq * n


def section_cuda_graphs(ctx: Context) -> dict:
    """Graph replay vs the eager forward on the same decode batches: hidden states and time per step."""
    llm = ctx.need_engine()
    runner = llm.llm_engine.model_runner
    graphs = runner.cuda_graphs
    if graphs is None:
        return {"passed": ctx.device.type != "cuda", "note": "no CUDA graphs on this device / setting"}
    context = 64 if ctx.args.dry_run else 512
    sizes = [n for n in (1, 3, 8, 13, 64, 100, 256) if n <= graphs.sizes[-1]]
    rows, ok = [], True
    with torch.inference_mode():
        for k, v in runner.kv_caches:  # random K/V, so attention is not averaging zeros
            k.normal_()
            v.normal_()
        for n in sizes:
            sched, blocks = decode_batch(runner, n, context)
            if blocks > runner.num_blocks:
                continue
            graphed = graphs.run(sched).float().clone()
            inputs = runner.prepare_inputs(sched)
            eager = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.attn_metadata).float()
            rel = ((graphed - eager).norm() / eager.norm()).item()
            def eager_step(sched=sched):
                i = runner.prepare_inputs(sched)
                return runner.model(i.input_ids, i.positions, runner.kv_caches, i.attn_metadata)

            t_graph = ctx.timed(lambda: graphs.run(sched), iters=20)
            t_eager = ctx.timed(eager_step, iters=10)
            passed = rel < 2e-2  # bf16; the split count differs (graphs size it for max_model_len)
            ok &= passed
            rows.append({"batch": n, "padded_to": min(s for s in graphs.sizes if s >= n), "context": context,
                         "rel_diff_vs_eager": rel, "graph_ms": t_graph * 1e3, "eager_ms": t_eager * 1e3,
                         "speedup": t_eager / t_graph, "passed": passed})
            ctx.log(f"  batch {n:3d}: graph {t_graph * 1e3:.2f} ms, eager {t_eager * 1e3:.2f} ms, rel diff {rel:.1e}")
    llm.reset_prefix_cache()  # the cache now holds noise
    return {"passed": ok, "sizes": graphs.sizes, "capture_s": graphs.capture_seconds,
            "capture_bytes": graphs.capture_bytes, "batches": rows}


def section_sync_audit(ctx: Context) -> dict:
    """Every host sync inside engine steps (prefill, chunked, decode by graph and eagerly), by
    torch's own sync detector; a step should have exactly one: the sampled tokens."""
    from pagedllm import SamplingParams

    if ctx.device.type != "cuda":
        return {"note": "needs CUDA"}
    llm = ctx.need_engine()
    engine = llm.llm_engine
    llm.reset_prefix_cache()
    rng = random.Random(3)
    plain = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=0.7, seed=5, presence_penalty=0.3, max_tokens=12, ignore_eos=True)
    longest = min(1500, engine.config.model_config.max_model_len - 20)
    for i in range(12):  # long ones are chunked: prefill, chunk, mixed and decode steps
        top = min(5000, vocab_size(ctx.big_model))
        engine.add_request(f"sync{i}", [rng.randrange(3, top) for _ in range(rng.randint(20, longest))],
                           seeded if i % 4 == 0 else plain)
    per_step, where = [], Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        while engine.has_unfinished_requests():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()
            syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
            per_step.append(len(syncs))
            where.update(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"passed": bool(per_step) and max(per_step) <= 1, "steps": len(per_step),
            "syncs_per_step": dict(Counter(per_step)), "where": dict(where)}


def section_profile(ctx: Context) -> dict:
    """torch.profiler over five decode steps of 64 sequences, with graphs and eagerly."""
    from torch.profiler import ProfilerActivity, profile

    from pagedllm import SamplingParams

    llm = ctx.need_engine()
    engine = llm.llm_engine
    runner = engine.model_runner
    llm.reset_prefix_cache()
    rng = random.Random(4)
    max_len = engine.config.model_config.max_model_len
    prompt_len, max_tokens = min(300, max_len // 2), min(40, max_len // 4)
    num_seqs = 4 if ctx.args.dry_run else 64  # the interpreter is slow
    for i in range(num_seqs):
        engine.add_request(f"prof{i}", [rng.randrange(3, min(5000, vocab_size(ctx.big_model))) for _ in range(prompt_len)],
                           SamplingParams(temperature=0.6, max_tokens=max_tokens, ignore_eos=True))
    for _ in range(8):  # past the prefills
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    sort_cuda = "self_cuda_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    tables, graphs = {}, runner.cuda_graphs
    for label in ("graphs", "eager"):
        if label == "eager":
            runner.cuda_graphs = None
        try:
            with profile(activities=activities) as prof:
                for _ in range(2 if ctx.args.dry_run else 5):
                    engine.step()
                sync(ctx.device)
        finally:
            runner.cuda_graphs = graphs
        averages = prof.key_averages()
        try:
            by_device = averages.table(sort_by=sort_cuda, row_limit=20)
        except (AttributeError, KeyError, ValueError):
            by_device = averages.table(sort_by="self_device_time_total", row_limit=20)
        tables[label] = {"by_device_time": by_device, "by_cpu_time": averages.table(sort_by="self_cpu_time_total",
                                                                                     row_limit=15)}
    while engine.has_unfinished_requests():
        engine.step()
    text = "\n\n".join(f"=== decode steps, {num_seqs} sequences, {label}: {kind.replace('_', ' ')}\n{t}"
                       for label, d in tables.items() for kind, t in d.items())
    path = ctx.out_dir / f"gpu_check-{ctx.stamp}-profile.txt"
    path.write_text(text)
    return {"file": str(path), "tables": tables}


# ----- transformers --------------------------------------------------------------------------------
def section_transformers(ctx: Context) -> dict:
    w = ctx.need_workload()
    n = w["hf_num"]
    prompts, out_lens = w["prompts"][:n], w["out_lens"][:n]
    result = {}
    hf = hf_generate_throughput(ctx.big_model, prompts, out_lens, ctx.dtype, ctx.device, ctx.args.hf_batch_size)
    result["generate"] = hf
    ctx.log(f"  transformers generate: {hf['output_tok_s']:.0f} output tok/s on {n} requests ({hf['elapsed_s']:.1f} s)")
    try:
        cb = hf_generate_batch_throughput(ctx.big_model, prompts, out_lens, ctx.dtype, ctx.device)
        result["generate_batch"] = cb
        ctx.log(f"  transformers generate_batch: {cb['output_tok_s']:.0f} output tok/s on {n} requests, each "
                f"{cb['max_new_tokens']} tokens ({cb['elapsed_s']:.1f} s)")
    except Exception as e:  # not in every transformers version
        result["generate_batch"] = {"error": f"{type(e).__name__}: {e}"}
        ctx.log(f"  transformers generate_batch: {result['generate_batch']['error']}")
    ours = (ctx.results.get("throughput") or {}).get("pagedllm_hf_subset")
    if ours:
        result["pagedllm_same_requests"] = ours
        result["speedup_vs_generate"] = ours["output_tok_s"] / hf["output_tok_s"]
        if "output_tok_s" in result["generate_batch"]:
            result["speedup_vs_generate_batch"] = ours["output_tok_s"] / result["generate_batch"]["output_tok_s"]
        result["passed"] = result["speedup_vs_generate"] >= 10 or ctx.args.dry_run
    return result


# ----- kernels ------------------------------------------------------------------------------------
def section_kernels(ctx: Context) -> dict:
    """The Triton backend against plain SDPA on model-like shapes, every dtype, both block sizes, and
    a bfloat16 KV cache under float32 compute (kv_cache_dtype)."""
    from pagedllm.attention.ops import paged_decode, prefix_prefill
    from pagedllm.attention.testing import PagedBatch
    from pagedllm.attention.torch_paged_attention import TorchPagedAttention, TorchPagedAttentionBackend
    from pagedllm.attention.triton_paged_attention import TritonPagedAttention, TritonPagedAttentionBackend

    dev = ctx.device
    tol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    # (name, heads, kv heads, head_dim, block size)
    shapes = [("qwen3-0.6b", 16, 8, 128, 16), ("llama-gqa3", 12, 4, 64, 32), ("mqa-d80", 8, 1, 80, 16)]
    # (context_len, query_len): decodes first, then a fresh prompt, a prefix-cache hit, a chunk.
    mixed = [(700, 1), (2000, 1), (0, 1), (0, 900), (512, 300), (37, 260)]
    decodes = [(3000, 1), (17, 1), (1024, 1), (511, 1)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    if ctx.args.dry_run:  # the interpreter is slow
        mixed = [(40, 1), (90, 1), (0, 1), (0, 60), (32, 20), (37, 15)]
        decodes = [(150, 1), (17, 1), (64, 1), (31, 1)]
        shapes, dtypes = shapes[:2], dtypes[:2]
    cases = [(dtype, None) for dtype in dtypes] + [(torch.float32, torch.bfloat16)]
    rows, ok = [], True
    for name, h, kvh, d, bs in shapes:
        for dtype, cache_dtype in cases:
            kw = dict(dtype=dtype, device=dev, cache_dtype=cache_dtype)
            batch = PagedBatch(mixed, h, kvh, d, bs, seed=1, **kw)
            key, value, slots = batch.take_new_kv()
            torch_cache = (batch.k_cache.nan_to_num(0.0), batch.v_cache.nan_to_num(0.0))
            triton_cache = (batch.k_cache, batch.v_cache)
            out = TritonPagedAttention(h, kvh, d, d**-0.5).forward(
                batch.query, key, value, triton_cache, batch.metadata(slots, TritonPagedAttentionBackend))
            ref = batch.reference()
            err_mixed = (out.float() - ref).abs().max().item()
            reference_backend = TorchPagedAttention(h, kvh, d, d**-0.5).forward(
                batch.query, key, value, torch_cache, batch.metadata(slots, TorchPagedAttentionBackend))
            err_torch_backend = (reference_backend.float() - ref).abs().max().item()
            same_cache = all(torch.equal(a.nan_to_num(0.0), b) for a, b in zip(triton_cache, torch_cache))
            dec = PagedBatch(decodes, h, kvh, d, bs, seed=2, **kw)
            dref = dec.reference()
            errs_split = {}
            for splits in (1, 4, None):
                o = torch.full_like(dec.query, float("nan"))
                paged_decode(o, dec.query, dec.k_cache, dec.v_cache, dec.block_tables, dec.seq_lens, dec.max_seq_len,
                             d**-0.5, num_splits=splits)
                errs_split[str(splits or "auto")] = (o.float() - dref).abs().max().item()
            pre = PagedBatch([s for s in mixed if s[1] > 1], h, kvh, d, bs, seed=3, **kw)
            o = torch.full_like(pre.query, float("nan"))
            prefix_prefill(o, pre.query, pre.k_cache, pre.v_cache, pre.block_tables, pre.query_start_loc,
                           pre.seq_lens, pre.max_query_len, d**-0.5)
            err_prefill = (o.float() - pre.reference()).abs().max().item()
            errs = [err_mixed, err_prefill, *errs_split.values()]
            passed = same_cache and all(e <= tol[dtype] for e in errs)  # NaN fails too
            ok &= passed
            label = str(dtype).removeprefix("torch.") + (f"/{str(cache_dtype).removeprefix('torch.')} cache"
                                                          if cache_dtype else "")
            rows.append({"shape": name, "dtype": label, "block_size": bs, "passed": passed,
                         "max_err_mixed_batch": err_mixed, "max_err_prefill": err_prefill,
                         "max_err_decode_by_splits": errs_split, "max_err_torch_backend": err_torch_backend,
                         "cache_writes_match_torch_backend": same_cache})
            ctx.log(f"  kernels {name} {rows[-1]['dtype']}: {'ok' if passed else 'FAILED'} (max err {max(errs):.2e})")
            del batch, dec, pre, torch_cache, triton_cache
            free_memory(dev)
    return {"passed": ok, "cases": rows}


def section_attention_bench(ctx: Context) -> dict:
    """The Triton kernels at Qwen3-0.6B's attention shape (16 heads, 8 KV heads, head_dim 128, bf16)."""
    from pagedllm.attention.ops import paged_decode, prefix_prefill
    from pagedllm.attention.testing import PagedBatch

    dev, dry, quick = ctx.device, ctx.args.dry_run, ctx.args.quick
    floor = ctx.results.get("floor")
    h, kvh, d, bs = 16, 8, 128, 16
    dtype = torch.float32 if dry else torch.bfloat16
    elem = torch.empty((), dtype=dtype).element_size()
    out = {}
    n_dec, ctx_len = (4, 64) if dry else (64, 512) if quick else (256, 1024)
    for label, num in (("decode_batch", n_dec), ("decode_single", 1)):
        dec = PagedBatch([(ctx_len * (4 if num == 1 else 1), 1)] * num, h, kvh, d, bs, dtype=dtype, device=dev,
                         fill=0.0)
        o = torch.empty_like(dec.query)
        t = ctx.timed(lambda: paged_decode(o, dec.query, dec.k_cache, dec.v_cache, dec.block_tables, dec.seq_lens,
                                           dec.max_seq_len, d**-0.5), iters=2 if dry else 20)
        kv_bytes = 2 * sum(c + 1 for c, _ in dec.seqs) * kvh * d * elem
        out[label] = {"seqs": num, "context": dec.max_seq_len, "ms": t * 1e3, "kv_GBps": kv_bytes / t / 1e9}
        if floor and floor.get("copy_GBps"):
            out[label]["fraction_of_copy_bw"] = out[label]["kv_GBps"] / floor["copy_GBps"]
        ctx.log(f"  {label}: {t * 1e3:.3f} ms, {out[label]['kv_GBps']:.0f} GB/s of K/V")
        del dec
    n_pre, plen = (2, 64) if dry else (4, 1024) if quick else (8, 2048)
    pre = PagedBatch([(0, plen)] * n_pre, h, kvh, d, bs, dtype=dtype, device=dev, fill=0.0)
    o = torch.empty_like(pre.query)
    t = ctx.timed(lambda: prefix_prefill(o, pre.query, pre.k_cache, pre.v_cache, pre.block_tables, pre.query_start_loc,
                                         pre.seq_lens, pre.max_query_len, d**-0.5), iters=2 if dry else 10)
    flops = n_pre * 4 * h * d * plen * plen / 2  # QK^T and PV, causal half
    out["prefill"] = {"seqs": n_pre, "prompt_len": plen, "ms": t * 1e3, "TFLOPs": flops / t / 1e12}
    if floor and floor.get("matmul_TFLOPs"):
        out["prefill"]["fraction_of_matmul"] = out["prefill"]["TFLOPs"] / floor["matmul_TFLOPs"]
    ctx.log(f"  prefill: {t * 1e3:.3f} ms, {out['prefill']['TFLOPs']:.1f} TFLOP/s")
    return out


def section_kernel_tests(ctx: Context) -> dict:
    """The CPU test files that exercise the GPU path, run on the GPU (compiled kernels)."""
    tests = ["test_triton_attention.py", "test_cuda_graph_runner.py", "test_memory_profiler.py",
             "test_triton_gguf_matmul.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *(str(ROOT / "tests" / t) for t in tests)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    for line in tail[-3:]:
        ctx.log(f"  {line}")
    return {"passed": proc.returncode == 0, "returncode": proc.returncode, "summary": tail[-1] if tail else "",
            "tail": tail}


# ----- the table --------------------------------------------------------------------------------------
def headline(name: str, r: dict) -> str:
    try:
        if name == "env":
            return (f"{r['device']}, {r['attention_backend']}, torch {r['torch']}, triton {r['triton']}, "
                    f"transformers {r['transformers']}")
        if name == "floor":
            return f"copy {r['copy_GBps']:.0f} GB/s, {r['matmul_dtype']} matmul {r['matmul_TFLOPs']:.1f} TFLOP/s"
        if name == "hf_equivalence":
            bad = [k for k, v in r["runs"].items() if not v["passed"]]
            return f"{len(r['runs']) - len(bad)}/{len(r['runs'])} model/dtype/engine runs pass" + (
                f"; failing: {', '.join(bad)}" if bad else "")
        if name == "throughput":
            p = r["pagedllm"]
            text = (f"{p['output_tok_s']:.0f} out tok/s, {p['total_tok_s']:.0f} total tok/s ({r['num_prompts']} req, "
                    f"{p['elapsed_s']:.1f} s, {p['stages']['ms_per_step']:.1f} ms/step)")
            if "fraction_of_floor" in r:
                text += f"; floor {r['floor']['seconds']:.1f} s = {100 * r['fraction_of_floor']:.0f}% of elapsed"
            return text
        if name == "cuda_graphs":
            return "; ".join(f"bs {b['batch']}: x{b['speedup']:.1f}" for b in r.get("batches", [])) or r.get("note", "")
        if name == "sync_audit":
            return f"syncs per step {r['syncs_per_step']} over {r['steps']} steps" if "steps" in r else r["note"]
        if name == "profile":
            return r["file"]
        if name == "transformers":
            text = f"generate {r['generate']['output_tok_s']:.0f} out tok/s"
            if "output_tok_s" in r.get("generate_batch", {}):
                text += f", generate_batch {r['generate_batch']['output_tok_s']:.0f}"
            if "speedup_vs_generate" in r:
                text += (f"; pagedllm {r['pagedllm_same_requests']['output_tok_s']:.0f} on the same "
                         f"{r['generate']['requests']} req = x{r['speedup_vs_generate']:.1f} generate")
                if "speedup_vs_generate_batch" in r:
                    text += f", x{r['speedup_vs_generate_batch']:.1f} generate_batch"
            return text
        if name == "kernels":
            worst = max(max(c["max_err_mixed_batch"], c["max_err_prefill"], *c["max_err_decode_by_splits"].values())
                        for c in r["cases"])
            return f"{sum(c['passed'] for c in r['cases'])}/{len(r['cases'])} cases pass, worst max err {worst:.1e}"
        if name == "attention_bench":
            return (f"decode {r['decode_batch']['kv_GBps']:.0f} GB/s (batch), {r['decode_single']['kv_GBps']:.0f} GB/s "
                    f"(1 seq); prefill {r['prefill']['TFLOPs']:.1f} TFLOP/s")
        if name == "kernel_tests":
            return r["summary"]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    return ""
