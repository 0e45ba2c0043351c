"""What JSON-schema structured outputs cost in pagedllm's decode throughput: W1 with and without a grammar, one LLM.

W1 is compare_cpu.py's workload: random-token prompts of 32-256 ids, greedy, 64 output tokens. Both
runs of each pair happen in this one process on the same `LLM`, alternating, fastest of `--repeats`:

- `corpus`: every request carries one of the 20 schemas of tests/json_schemas.py (cycled), `max_tokens=64`,
  EOS not ignored. A constrained request ends when its JSON is complete (the grammar then allows only EOS),
  so its length is the model's, not 64: throughput of a constrained run that ends early against 64-token
  unconstrained requests would compare different batch shapes (fewer sequences per step, more steps at
  small batch), not the grammar. So its unconstrained twin gives request i exactly the n_i tokens the
  constrained request i produced (`max_tokens=n_i, ignore_eos=True`): the same prompts, the same number of
  sequences at every step, the same tokens counted; only the grammar differs.
- `tags`: W1's own shape under a grammar: every request carries `TAGS_SCHEMA`, an array of at least 40 short
  strings, which cannot be complete in 64 tokens, so every request runs the full 64 tokens like W1
  (EOS is masked until the array is long enough); its twin is then plain W1. The twin is matched the same
  way as `corpus`, so the comparison stays fair if some request does end early.

The JSON is compact (`disable_any_whitespace=True`) unless `--any-whitespace`: on W1's random prompts, SmolLM2 left
free to add whitespace spends most of its 64 tokens on newlines between keys (`{ \n"name" \n:\n\n\n...`),
grammar states whose masks are trivial, which would flatter the ratio; compact JSON makes every token a step
through the schema's structure (keys, enums, patterns, bounded strings and numbers).

The constrained runs are timed with their grammars already compiled: first every schema is sent once on
its own (`max_tokens=1`), cold and then three times cached. Reported per schema, with median and max: the
engine's own time for the compile (timed on its compile thread), and the cold request's time over the fastest
cached one (what a first request with a new schema waits). Every constrained output that ends with EOS must be
valid against its schema (jsonschema, structure; string formats are checked and reported apart, since
xgrammar's format regexes accept e.g. 2025-02-30). PASS: both ratios (constrained / unconstrained output
tok/s) >= 0.85 and no invalid output. Beside it the table shows the same ratio in tokens per CPU-second of
this process, which another job's load on a shared machine disturbs much less than wall time (with
`--threads 1`, nearly not at all); use it to tell a real cost from a busy machine. Writes JSON under
benchmarks/results/.

    python benchmarks/structured_outputs.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "tests"))
from json_schemas import SCHEMAS  # noqa: E402

# At least 40 items of at least one character each: more than 64 tokens, so a W1-length request never ends it.
TAGS_SCHEMA = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 12}, "minItems": 40}
PASS_RATIO = 0.85


def log(message: str) -> None:
    print(f"[so-bench] {message}", flush=True)


def w1_prompts(llm: Any, args: argparse.Namespace) -> list[list[int]]:
    from pagedllm.benchmarks.datasets import random_requests

    vocab = llm.llm_engine.config.model_config.vocab_size
    reqs = random_requests(args.num_prompts, (args.input_min, args.input_max), (args.output_len, args.output_len),
                           vocab, seed=args.seed, avoid_ids=frozenset(llm.get_tokenizer().all_special_ids))
    return [r.prompt_token_ids for r in reqs]


def constrained(schema: dict, max_tokens: int, any_whitespace: bool) -> Any:
    from pagedllm import SamplingParams
    from pagedllm.sampling_params import StructuredOutputsParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(
        json=schema, disable_any_whitespace=not any_whitespace))


def time_compiles(llm: Any, schemas: list[tuple[str, dict]], prompt: list[int], any_whitespace: bool) -> list[dict]:
    """Per schema, one request alone (`max_tokens=1`) cold, then three times cached: the engine's own time for
    the compile (its StructuredOutputManager times it on the compile thread), and how much longer the cold
    request took than the fastest cached one (what a first request with a new schema waits)."""
    from tqdm.auto import tqdm

    manager = llm.llm_engine.engine_core.core.structured_output_manager  # the engine core runs in this process
    request = [{"prompt_token_ids": prompt}]
    rows = []
    for name, schema in tqdm(schemas, desc="compiling schemas", dynamic_ncols=True):
        seconds = []
        for attempt in range(4):
            llm.reset_prefix_cache()
            start = time.perf_counter()
            llm.generate(request, constrained(schema, 1, any_whitespace), use_tqdm=False)
            seconds.append(time.perf_counter() - start)
            if attempt == 0:
                compile_ms = manager.last_compile_seconds * 1e3
        cold, warm = seconds[0], min(seconds[1:])
        rows.append({"schema": name, "compile_ms": compile_ms, "cold_request_ms": cold * 1e3,
                     "cached_request_ms": warm * 1e3, "first_request_extra_ms": (cold - warm) * 1e3})
    return rows


def generate(llm: Any, prompts: list[list[int]], params: list[Any]) -> tuple[float, float, list[Any]]:
    """Wall and CPU seconds (this process: the engine core runs in it) of one generate call, and its outputs."""
    llm.reset_prefix_cache()
    wall, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - wall, time.process_time() - cpu, outs


def check_outputs(outs: list[Any], schemas: list[dict]) -> dict:
    """Every output that ended with EOS must be a valid instance of its schema."""
    import jsonschema

    counts = {"ended_by_eos": 0, "truncated": 0, "valid": 0, "invalid": 0, "format_failures": 0}
    examples = []
    for out, schema in zip(outs, schemas):
        completion = out.outputs[0]
        if completion.finish_reason != "stop":
            counts["truncated"] += 1
            continue
        counts["ended_by_eos"] += 1
        try:
            instance = json.loads(completion.text)
            jsonschema.Draft202012Validator(schema).validate(instance)
        except (ValueError, jsonschema.ValidationError) as exc:
            counts["invalid"] += 1
            if len(examples) < 3:
                examples.append({"text": completion.text, "error": str(exc).splitlines()[0]})
            continue
        counts["valid"] += 1
        checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        counts["format_failures"] += not checker.is_valid(instance)
    counts["invalid_examples"] = examples
    return counts


def compare(llm: Any, prompts: list[list[int]], name: str, schemas: list[dict], args: argparse.Namespace) -> dict:
    """The constrained run and its length-matched unconstrained twin, in alternating order (constrained first on
    even repeats, since the twin needs the constrained lengths), fastest of `--repeats` each."""
    from pagedllm import SamplingParams

    tok_s: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
    tok_cpu_s: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
    lengths: list[int] | None = None
    changed_lengths = 0  # greedy decoding should make the same tokens every repeat
    for repeat in range(args.repeats):
        for kind in ("constrained", "unconstrained") if repeat % 2 == 0 else ("unconstrained", "constrained"):
            if kind == "constrained":
                seconds, cpu_seconds, outs = generate(llm, prompts, [constrained(s, args.output_len, args.any_whitespace) for s in schemas])
                tokens = [len(o.outputs[0].token_ids) for o in outs]
                changed_lengths += lengths is not None and tokens != lengths
                lengths = lengths or tokens
                constrained_outs = outs
            else:
                twin = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
                seconds, cpu_seconds, outs = generate(llm, prompts, twin)
                tokens = [len(o.outputs[0].token_ids) for o in outs]
                if tokens != lengths:
                    raise RuntimeError(f"{name}: the unconstrained twin's lengths differ from the constrained run's")
            tok_s[kind].append(sum(tokens) / seconds)
            tok_cpu_s[kind].append(sum(tokens) / cpu_seconds)
        log(f"{name} {repeat + 1}/{args.repeats}: constrained {tok_s['constrained'][-1]:.1f} tok/s, "
            f"unconstrained {tok_s['unconstrained'][-1]:.1f} tok/s ({sum(lengths)} tokens; per CPU-second "
            f"{tok_cpu_s['constrained'][-1]:.1f} and {tok_cpu_s['unconstrained'][-1]:.1f})")
    row = {
        "workload": name, "output_tokens": sum(lengths), "mean_output_len": sum(lengths) / len(lengths),
        "requests_at_max_tokens": sum(n == args.output_len for n in lengths), "changed_lengths": changed_lengths,
        "unconstrained_tok_s_all": tok_s["unconstrained"], "constrained_tok_s_all": tok_s["constrained"],
        "unconstrained_tok_s": max(tok_s["unconstrained"]), "constrained_tok_s": max(tok_s["constrained"]),
        "unconstrained_tok_cpu_s_all": tok_cpu_s["unconstrained"], "constrained_tok_cpu_s_all": tok_cpu_s["constrained"],
        "unconstrained_tok_cpu_s": max(tok_cpu_s["unconstrained"]), "constrained_tok_cpu_s": max(tok_cpu_s["constrained"]),
        "outputs": check_outputs(constrained_outs, schemas),
        "sample_output": constrained_outs[0].outputs[0].text,
    }
    row["ratio"] = row["constrained_tok_s"] / row["unconstrained_tok_s"]
    row["cpu_ratio"] = row["constrained_tok_cpu_s"] / row["unconstrained_tok_cpu_s"]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (W1 uses all)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-min", type=int, default=32)
    p.add_argument("--input-max", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3, help="time each run this many times, alternating, keep the fastest")
    p.add_argument("--backend", default="xgrammar", help="the engine's structured_outputs_backend")
    p.add_argument("--any-whitespace", action="store_true",
                   help="JSON with any whitespace (xgrammar's default) instead of compact JSON; see the docstring")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pagedllm import LLM, SamplingParams
    from pagedllm.model_executor.model_source import resolve_model

    model = resolve_model(args.model)
    load_before = os.getloadavg()  # a shared machine's other work, recorded beside the figures
    log(f"loading {model.name} ({args.dtype}, {args.threads} threads)")
    llm = LLM(model=model.path, dtype=args.dtype, max_model_len=1024, structured_outputs_backend=args.backend)
    prompts = w1_prompts(llm, args)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(max_tokens=4), use_tqdm=False)

    log(f"compiling {len(SCHEMAS)} corpus schemas and the tags schema (cold, then cached)")
    compiles = time_compiles(llm, [*SCHEMAS, ("tags", TAGS_SCHEMA)], prompts[0][:32], args.any_whitespace)
    corpus_compiles = compiles[:len(SCHEMAS)]

    corpus = [schema for _, schema in SCHEMAS]
    rows = [compare(llm, prompts, "corpus", [corpus[i % len(corpus)] for i in range(len(prompts))], args),
            compare(llm, prompts, "tags", [TAGS_SCHEMA] * len(prompts), args)]

    print()
    print(f"W1 with structured outputs: {args.num_prompts} prompts, {args.input_min}-{args.input_max} prompt tokens, "
          f"up to {args.output_len} output tokens, greedy, {args.dtype}, {args.threads} threads, "
          f"backend {args.backend}, {'any-whitespace' if args.any_whitespace else 'compact'} JSON, {platform.node()}")
    print(f"{'workload':<10}{'mean len':>9}{'unconstrained tok/s':>21}{'constrained tok/s':>19}{'ratio':>7}"
          f"{'CPU-time ratio':>16}{'valid/EOS':>11}  verdict")
    passed = True
    for r in rows:
        o = r["outputs"]
        ok = r["ratio"] >= PASS_RATIO and o["invalid"] == 0
        passed &= ok
        print(f"{r['workload']:<10}{r['mean_output_len']:>9.1f}{r['unconstrained_tok_s']:>21.1f}"
              f"{r['constrained_tok_s']:>19.1f}{r['ratio']:>7.2f}{r['cpu_ratio']:>16.2f}{o['valid']:>6}/{o['ended_by_eos']:<4}  "
              f"{'PASS' if ok else 'FAIL'}")
    for r in rows:
        for bad in r["outputs"]["invalid_examples"]:
            print(f"  invalid {r['workload']} output: {bad['text'][:100]!r}: {bad['error']}")
    print()
    compile_ms = [c["compile_ms"] for c in corpus_compiles]
    extra_ms = [c["first_request_extra_ms"] for c in corpus_compiles]
    print(f"grammar compile of the {len(corpus_compiles)} corpus schemas, in the engine, excluded from the timings above:")
    print(f"  compile                     median {statistics.median(compile_ms):6.1f} ms, max {max(compile_ms):6.1f} ms")
    print(f"  first request minus cached  median {statistics.median(extra_ms):6.1f} ms, max {max(extra_ms):6.1f} ms")
    print("  " + ", ".join(f"{c['schema']} {c['compile_ms']:.0f}" for c in compiles) + " (ms)")
    print(f"\n{'PASS' if passed else 'FAIL'}: constrained/unconstrained >= {PASS_RATIO} and every EOS-ended output valid")

    stamp = datetime.now(timezone.utc)
    record = {
        "date": stamp.isoformat(), "machine": platform.node(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "load_average_before_after": [load_before, os.getloadavg()],
        "model": model.name, "backend": args.backend,
        "workload": {k: getattr(args, k) for k in ("num_prompts", "input_min", "input_max", "output_len", "seed",
                                                   "dtype", "repeats", "any_whitespace")},
        "pass_ratio": PASS_RATIO, "passed": passed, "results": rows, "compile": compiles,
        "compile_summary_ms": {"compile_median": statistics.median(compile_ms), "compile_max": max(compile_ms),
                               "first_request_extra_median": statistics.median(extra_ms),
                               "first_request_extra_max": max(extra_ms)},
    }
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.output_json) if args.output_json else (
        RESULTS / f"structured_outputs-{args.dtype}-{stamp:%Y%m%d-%H%M}-{platform.node()}.json")
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
