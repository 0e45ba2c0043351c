"""`pagedllm bench throughput` and `pagedllm bench latency`: the offline engine, measured."""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

from tqdm.auto import tqdm

from pagedllm.benchmarks.datasets import parse_range, random_requests
from pagedllm.benchmarks.stats import format_table, summarize
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.entrypoints.llm import LLM
from pagedllm.sampling_params import SamplingParams


def _llm_and_requests(args: argparse.Namespace, num: int, input_len: str, output_len: str):
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    tokenizer = llm.get_tokenizer()
    requests = random_requests(
        num, parse_range(input_len), parse_range(output_len), llm.llm_engine.config.model_config.vocab_size,
        seed=args.dataset_seed, avoid_ids=frozenset(tokenizer.all_special_ids),
    )
    return llm, requests


def _params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def _write_json(path: str | None, result: dict) -> None:
    if path:
        result = {"date": datetime.now(timezone.utc).isoformat(), "machine": platform.node(), **result}
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def run_throughput(args: argparse.Namespace) -> dict:
    llm, requests = _llm_and_requests(args, args.num_prompts, args.input_len, args.output_len)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [_params(r.output_len) for r in requests]
    if args.warmup:
        llm.generate(prompts[:2], params[:2], use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(r.prompt_token_ids) for r in requests)
    result = {
        "num_prompts": len(requests),
        "elapsed_s": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        **spec_decode_report(llm),
    }
    print(format_table("Offline throughput", [(k, v) for k, v in result.items()]))
    _write_json(args.output_json, {"benchmark": "throughput", "args": vars_json(args), **result})
    llm.shutdown()
    return result


def run_latency(args: argparse.Namespace) -> dict:
    llm, requests = _llm_and_requests(args, args.batch_size, str(args.input_len), str(args.output_len))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = _params(args.output_len)
    for _ in tqdm(range(args.num_iters_warmup), desc="Warmup"):
        llm.generate(prompts, params, use_tqdm=False)
    llm.reset_prefix_cache()  # each measured iteration computes its prompts
    latencies = []
    for _ in tqdm(range(args.num_iters), desc="Iterations"):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        latencies.append(time.perf_counter() - start)
        llm.reset_prefix_cache()
    stats = summarize(latencies, (10, 25, 50, 75, 90, 99))
    spec = spec_decode_report(llm)
    result = {"avg_latency": stats["mean"], "latencies": latencies,
              "percentiles": {k: v for k, v in stats.items() if k.startswith("p")}, **spec}
    print(format_table("Latency (s)", [(k, v) for k, v in stats.items()]))
    if spec:
        print(format_table("Speculative decoding", list(spec.items())))
    _write_json(args.output_json, {"benchmark": "latency", "args": vars_json(args), **result})
    llm.shutdown()
    return result


def spec_decode_report(llm: LLM) -> dict:
    """With a speculative_config: vLLM's spec_decode counters since the engine started (warm-up included),
    the acceptance rate and the mean acceptance length (tokens per verification step); else nothing."""
    if llm.llm_engine.config.speculative_config is None:
        return {}
    values = {m.name.removeprefix("pagedllm:"): m.value for m in llm.get_metrics() if not m.labels}
    drafts, draft_tokens, accepted = (values["spec_decode_num_drafts"], values["spec_decode_num_draft_tokens"],
                                      values["spec_decode_num_accepted_tokens"])
    report = {"spec_decode_num_drafts": drafts, "spec_decode_num_draft_tokens": draft_tokens,
              "spec_decode_num_accepted_tokens": accepted,
              "spec_decode_acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
              "spec_decode_mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0}
    per_pos = sorted((int(m.labels["position"]), m.value) for m in llm.get_metrics()
                     if m.name.endswith("spec_decode_num_accepted_tokens_per_pos"))
    report.update({f"spec_decode_acceptance_rate_pos{pos}": count / drafts if drafts else 0.0
                   for pos, count in per_pos})
    return report


def as_command(run) -> callable:
    """A CLI handler (exit code 0) from a benchmark function that returns its result."""

    def command(args: argparse.Namespace) -> int:
        run(args)
        return 0

    return command


def vars_json(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def add_throughput_parser(subparsers) -> None:
    p = subparsers.add_parser("throughput", help="offline throughput on random prompts")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", default="32-256", help="prompt length, or a range LOW-HIGH (uniform)")
    p.add_argument("--output-len", default="64", help="output length, or a range LOW-HIGH (uniform)")
    p.add_argument("--dataset-seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=as_command(run_throughput))


def add_latency_parser(subparsers) -> None:
    p = subparsers.add_parser("latency", help="latency of one fixed batch, repeated")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--dataset-seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=as_command(run_latency))
