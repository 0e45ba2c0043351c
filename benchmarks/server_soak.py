"""A bounded soak of `pagedllm serve` on 127.0.0.1: many streaming clients, good and bad, then a killed engine.

`--clients` concurrent clients (64 by default) send, for `--duration` seconds, a mix of requests:
streamed completions and chats (each checked: exactly the tokens asked for, the usage chunk counting
them, one finish reason, one `[DONE]`), non-streamed `n=2` requests (usage = the tokens of both
choices), bad requests (each must be a 4xx), streams the client drops after two chunks, and requests it
abandons on a short timeout. Afterwards: no request lost or answered twice, no 5xx, every KV block
free, the server's and the engine core's resident memory at the start and the end. Last, the engine-core
process is killed mid-stream: the streams in flight must end with a clear error and /health must turn
503 while the server stays up (as docs/serving.md says). Prints a table, writes JSON under
benchmarks/results/.

    python benchmarks/server_soak.py --duration 300 --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
from server_process import HERE, idle_metrics, start_server, stop_server, tiny_model

API_KEY = "soak-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
BAD_BODIES = [
    {"prompt": "x", "top_k": 2**70}, {"prompt": "x", "temperature": -1}, {"prompt": [], "max_tokens": 2},
    {"prompt": "x", "max_tokens": 10**6}, {"prompt": "x", "stop": ["s"] * 40}, {"prompt": "x", "guided_regex": "a"},
    {"prompt": "x", "stream_options": {"include_usage": True}}, {"messages": "not a list"},
]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def engine_core_pid(server_pid: int) -> int:
    """The server's engine-core process: the spawned child with the most memory (multiprocessing's
    resource tracker is a spawned child too)."""
    found = []
    for task in os.listdir(f"/proc/{server_pid}/task"):
        with open(f"/proc/{server_pid}/task/{task}/children") as f:
            for pid in map(int, f.read().split()):
                with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                    if b"resource_tracker" not in cmd.read():
                        found.append(pid)
    return max(found, key=rss_mib)


class Tally:
    def __init__(self) -> None:
        self.outcomes: Counter = Counter()
        self.problems: list[str] = []
        self.ids: Counter = Counter()

    def problem(self, text: str) -> None:
        self.outcomes["problem"] += 1
        if len(self.problems) < 50:
            self.problems.append(text)


async def streamed(client: httpx.AsyncClient, base: str, tally: Tally, rng: random.Random, drop: bool) -> None:
    max_tokens = rng.randint(1, 24)
    chat = rng.random() < 0.5
    body = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": rng.choice([0, 0.8]), "stream": True,
            "stream_options": {"include_usage": True}}
    if chat:
        url, body["messages"] = base + "/v1/chat/completions", [{"role": "user", "content": f"Tell me {rng.random()}"}]
    else:
        url, body["prompt"] = base + "/v1/completions", f"Once upon a time {rng.random()}"
    chunks = done = 0
    usage = finish = response_id = None
    async with client.stream("POST", url, json=body, headers=HEADERS) as r:
        if r.status_code != 200:
            return tally.problem(f"stream got {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done += 1
                continue
            event = json.loads(data)
            if "error" in event:
                return tally.problem(f"stream error: {event['error']['message'][:100]}")
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            response_id = event.get("id", response_id)
            for choice in event.get("choices", []):
                chunks += 1
                finish = choice.get("finish_reason") or finish
            if drop and chunks >= 2:
                tally.outcomes["dropped mid-stream"] += 1
                return
    tally.ids[response_id] += 1
    if done != 1 or finish != "length" or usage != max_tokens:
        return tally.problem(f"stream ended wrong: done={done} finish={finish} usage={usage} asked={max_tokens}")
    tally.outcomes["stream ok"] += 1


async def batched(client: httpx.AsyncClient, base: str, tally: Tally, rng: random.Random) -> None:
    max_tokens = rng.randint(1, 16)
    r = await client.post(base + "/v1/completions", headers=HEADERS, json={
        "prompt": f"The number is {rng.random()}", "max_tokens": max_tokens, "n": 2, "ignore_eos": True,
        "temperature": 1.0, "logprobs": 1})
    if r.status_code != 200:
        return tally.problem(f"n=2 got {r.status_code}: {r.text[:100]}")
    out = r.json()
    tally.ids[out["id"]] += 1
    counted = sum(len(c["logprobs"]["tokens"]) for c in out["choices"])
    if len(out["choices"]) != 2 or out["usage"]["completion_tokens"] != 2 * max_tokens or counted != 2 * max_tokens:
        return tally.problem(f"n=2 usage {out['usage']} for {counted} tokens, asked 2 x {max_tokens}")
    tally.outcomes["n=2 ok"] += 1


async def bad(client: httpx.AsyncClient, base: str, tally: Tally, rng: random.Random) -> None:
    body = rng.choice(BAD_BODIES)
    url = base + ("/v1/chat/completions" if "messages" in body else "/v1/completions")
    r = await client.post(url, json=body, headers=HEADERS)
    if not 400 <= r.status_code < 500:
        return tally.problem(f"bad request got {r.status_code}: {body}")
    tally.outcomes["bad -> 4xx"] += 1


async def abandoned(base: str, tally: Tally, rng: random.Random) -> None:
    async with httpx.AsyncClient(timeout=0.3) as short:
        try:
            await short.post(base + "/v1/completions", headers=HEADERS,
                             json={"prompt": "A long story", "max_tokens": 200, "ignore_eos": True})
            tally.outcomes["finished before the timeout"] += 1
        except httpx.TimeoutException:
            tally.outcomes["abandoned"] += 1


async def client_loop(base: str, deadline: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(["stream", "drop", "batched", "bad", "abandon"], [50, 10, 15, 15, 10])[0]
            try:
                if kind in ("stream", "drop"):
                    await streamed(client, base, tally, rng, drop=kind == "drop")
                elif kind == "batched":
                    await batched(client, base, tally, rng)
                elif kind == "bad":
                    await bad(client, base, tally, rng)
                else:
                    await abandoned(base, tally, rng)
            except httpx.HTTPError as e:
                tally.problem(f"{kind}: {type(e).__name__}: {e}")


async def kill_engine_mid_stream(base: str, engine_pid: int, num_streams: int = 8) -> dict:
    """Streams in flight when the engine-core process is killed: each must end with a clear error."""
    started = asyncio.Semaphore(0)

    async def one(client: httpx.AsyncClient) -> str:
        body = {"prompt": "Keep talking", "max_tokens": 480, "ignore_eos": True, "stream": True}
        first = True
        async with client.stream("POST", base + "/v1/completions", json=body, headers=HEADERS) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            async for line in r.aiter_lines():
                if first and line.startswith("data: {"):
                    first = False
                    started.release()
                if line.startswith("data: {") and '"error"' in line:
                    return json.loads(line[6:])["error"].get("code") or "error"
        return "ended without an error"

    async with httpx.AsyncClient(timeout=60) as client:
        tasks = [asyncio.create_task(one(client)) for _ in range(num_streams)]
        for _ in range(num_streams):  # every stream has its first tokens: all are mid-stream now
            await started.acquire()
        os.kill(engine_pid, signal.SIGKILL)
        endings = await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)
        health = (await client.get(base + "/health")).status_code
        after = await client.post(base + "/v1/completions", headers=HEADERS, json={"prompt": "x", "max_tokens": 2})
    return {"stream_endings": dict(Counter(endings)), "health_after": health, "request_after": after.status_code}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model to serve (default: the tests' tiny random Llama)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=300, help="seconds of mixed traffic (bounded)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pagedllm-soak-"))
    model = args.model or tiny_model(work / "tiny")
    proc, base = start_server([model, "--api-key", API_KEY, "--max-model-len", "512", "--kv-cache-memory-bytes",
                               str(256 << 20), "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"],
                              work / "server.log")
    try:
        engine_pid = engine_core_pid(proc.pid)
        # warm-up, then the memory the soak starts from
        httpx.post(base + "/v1/completions", headers=HEADERS, json={"prompt": "warm up", "max_tokens": 8}, timeout=60)
        rss_start = {"server": rss_mib(proc.pid), "engine_core": rss_mib(engine_pid)}
        tally = Tally()
        start = time.monotonic()
        deadline = start + args.duration

        rss_warm: dict[str, float] = {}

        async def sample_memory_after_warm_up() -> None:
            # A third of the way in, the KV cache's pages (committed as blocks are first used) and the
            # heap have reached their working size: from here on memory should stay flat.
            await asyncio.sleep(args.duration / 3)
            rss_warm.update(server=rss_mib(proc.pid), engine_core=rss_mib(engine_pid))

        async def soak() -> None:
            await asyncio.gather(sample_memory_after_warm_up(),
                                 *(client_loop(base, deadline, tally, seed) for seed in range(args.clients)))

        asyncio.run(soak())
        elapsed = time.monotonic() - start
        values = idle_metrics(base)
        usage, running = values.get("pagedllm:kv_cache_usage_perc"), values.get("pagedllm:num_requests_running")
        rss_end = {"server": rss_mib(proc.pid), "engine_core": rss_mib(engine_pid)}
        duplicates = [i for i, n in tally.ids.items() if n > 1]
        kill = asyncio.run(kill_engine_mid_stream(base, engine_pid))
        server_alive = proc.poll() is None
    finally:
        stop_server(proc)

    total = sum(tally.outcomes.values())
    print(f"\nsoak: {args.clients} clients for {elapsed:.0f} s, {total} requests ({total / elapsed:.1f}/s), "
          f"{platform.node()}")
    for outcome, n in sorted(tally.outcomes.items()):
        print(f"  {outcome:<32}{n:>8}")
    print(f"  {'answered twice':<32}{len(duplicates):>8}")
    print(f"after: KV-cache usage {usage}, running {running}")
    print(f"RSS MiB (start / after a third / end): server {rss_start['server']:.0f} / {rss_warm['server']:.0f} / "
          f"{rss_end['server']:.0f}, engine core {rss_start['engine_core']:.0f} / {rss_warm['engine_core']:.0f} / "
          f"{rss_end['engine_core']:.0f}")
    print(f"engine killed mid-stream: {kill}; server still up: {server_alive}")
    ok = (not tally.problems and not duplicates and usage == 0 and running == 0
          and kill["health_after"] == 503 and kill["request_after"] == 503 and server_alive
          and "ended without an error" not in kill["stream_endings"])
    for problem in tally.problems[:10]:
        print("  problem:", problem)
    print("PASS" if ok else "FAIL")
    stamp = datetime.now(timezone.utc)
    out = Path(args.output_json) if args.output_json else (
        HERE / "results" / f"server_soak-{stamp:%Y%m%d-%H%M}-{platform.node()}.json")
    out.write_text(json.dumps({
        "date": stamp.isoformat(), "machine": platform.node(), "args": vars(args), "elapsed_s": elapsed,
        "outcomes": dict(tally.outcomes), "problems": tally.problems, "answered_twice": len(duplicates),
        "kv_cache_usage_after": usage, "running_after": running, "rss_mib_start": rss_start,
        "rss_mib_after_a_third": rss_warm, "rss_mib_end": rss_end,
        "engine_killed": kill, "server_alive_after_kill": server_alive, "pass": ok}, indent=2))
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
