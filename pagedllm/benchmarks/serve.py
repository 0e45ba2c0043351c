"""`pagedllm bench serve`: load an OpenAI-compatible server (ours or any other) and time it.

Requests are random token-id prompts sent to /v1/completions with streaming on; each
request's time to first token, inter-token latencies and end-to-end latency are taken
from the arrival times of the streamed chunks, as vLLM's `bench serve` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx
from tqdm.auto import tqdm

from pagedllm.benchmarks.datasets import BenchRequest, parse_range, random_requests
from pagedllm.benchmarks.offline import _write_json, as_command, vars_json
from pagedllm.benchmarks.stats import RequestRecord, format_table, serve_report


async def _one_request(client: httpx.AsyncClient, url: str, model: str, req: BenchRequest, t0: float,
                       headers: dict) -> RequestRecord:
    record = RequestRecord(start=time.perf_counter() - t0, prompt_tokens=len(req.prompt_token_ids))
    body = {
        "model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                record.success, record.error = False, f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return record
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    record.chunk_times.append(time.perf_counter() - t0)
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.success, record.error = False, f"{type(e).__name__}: {e}"
    if not record.chunk_times:
        record.success = False
    return record


async def _run(args: argparse.Namespace, requests: list[BenchRequest]) -> tuple[list[RequestRecord], float]:
    url = args.base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    rng = random.Random(args.dataset_seed)
    bar = tqdm(total=len(requests), desc="Requests")
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:
        t0 = time.perf_counter()

        async def limited(req: BenchRequest) -> RequestRecord:
            async with limit:
                record = await _one_request(client, url, args.model, req, t0, headers)
            bar.update(1)
            return record

        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return list(records), duration


def run_serve(args: argparse.Namespace) -> dict:
    if not args.model:
        with httpx.Client(timeout=30) as client:
            args.model = client.get(args.base_url.rstrip("/") + "/v1/models").json()["data"][0]["id"]
    requests = random_requests(args.num_prompts, parse_range(args.input_len), parse_range(args.output_len),
                               args.vocab_size, seed=args.dataset_seed)
    records, duration = asyncio.run(_run(args, requests))
    report = serve_report(records, duration)
    print(format_table("Serving benchmark", list(report.items())))
    errors = [r.error for r in records if not r.success]
    if errors:
        print(f"{len(errors)} requests failed, e.g. {errors[0]}")
    _write_json(args.output_json, {"benchmark": "serve", "args": vars_json(args), **report})
    return report


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="load a running OpenAI-compatible server")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", default="32-256")
    p.add_argument("--output-len", default="64")
    p.add_argument("--vocab-size", type=int, default=32000, help="prompt ids are drawn below this")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--dataset-seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=as_command(run_serve))
