"""Data parallelism through the real server: `pagedllm serve --data-parallel-size 2`.

Two engine replicas behind one API server, first as processes on this machine (each also split
over two tensor-parallel workers), then as Ray actors on a local Ray cluster started by the
server. Both replicas must receive work (their per-replica counters in /metrics, labelled
`engine` as vLLM labels them) and the answers must equal a single engine's.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import httpx
import pytest

from pagedllm import SamplingParams
from test_server_harness import RemoteServer

PROMPTS = [
    "The capital of France is",
    "Hello, my name is",
    "Continuous batching lets new requests join",
    "Prefix caching shares blocks",
    "def add(a, b):",
    "naïve café",
]
MAX_TOKENS = 12


def per_engine(server: RemoteServer, name: str) -> dict[str, float]:
    """{engine label: value} of one metric in /metrics."""
    text = httpx.get(server.url("/metrics"), timeout=10).text
    values = {}
    for line in text.splitlines():
        m = re.match(rf'^{re.escape(name)}\{{(.*)\}}\s+(\S+)$', line)
        if m:
            engine = re.search(r'engine="(\d+)"', m.group(1))
            if engine:
                values[engine.group(1)] = float(m.group(2))
    return values


def completions_at_once(server: RemoteServer, prompts: list[str]) -> list[str]:
    async def run() -> list[str]:
        client = server.async_client()
        responses = await asyncio.gather(*(
            client.completions.create(model=server.model_name, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
            for p in prompts))
        return [r.choices[0].text for r in responses]

    return asyncio.run(run())


def single_engine_answers(llm) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def check_two_replicas(server: RemoteServer, llm) -> None:
    expected = single_engine_answers(llm)
    assert completions_at_once(server, PROMPTS) == expected
    # One at a time too: ties go to the replica given fewest so far, so they alternate.
    client = server.client()
    for prompt, answer in zip(PROMPTS[:2], expected[:2]):
        r = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == answer
    server.wait_idle()
    prompt_tokens = per_engine(server, "pagedllm:prompt_tokens_total")
    assert set(prompt_tokens) == {"0", "1"}
    assert all(v > 0 for v in prompt_tokens.values()), prompt_tokens
    assert sum(per_engine(server, "pagedllm:generation_tokens_total").values()) == MAX_TOKENS * (len(PROMPTS) + 2)
    assert per_engine(server, "pagedllm:kv_cache_usage_perc") == {"0": 0.0, "1": 0.0}
    # Each replica's own engine state (its KV cache, its counters) behind ?engine=i.
    finished = []
    for index in (0, 1):
        state = httpx.get(server.url(f"/v1/engine/state?engine={index}"), headers=server.headers, timeout=30).json()
        assert state["engine"] == index and state["data_parallel_size"] == 2
        finished.append(state["counters"]["requests_finished"])
    assert all(n > 0 for n in finished) and sum(finished) == len(PROMPTS) + 2, finished
    bad = httpx.get(server.url("/v1/engine/state?engine=2"), headers=server.headers, timeout=30)
    assert bad.status_code == 400 and "engine" in bad.json()["error"]["message"]


def serve_two_replicas(llama_dir: str, llm, *args: str, prelude: str = "") -> str:
    """Start a real two-replica server, check it against one engine, stop it; its log."""
    server = RemoteServer(llama_dir, "--max-model-len", "256", "--served-model-name", "tiny", *args,
                          prelude=prelude or None)
    server.model_name = "tiny"
    try:
        check_two_replicas(server, llm)
    finally:
        code = server.stop()
    log = server.read_log()
    assert code in (0, -15), log
    return log


def test_two_replicas_each_tensor_parallel_share_the_work(llama_dir, llm):
    log = serve_two_replicas(llama_dir, llm, "--data-parallel-size", "2", "--tensor-parallel-size", "2")
    assert log.count("Started 2 tensor-parallel workers") == 2


def test_two_replicas_on_a_local_ray_cluster(llama_dir, llm):
    pytest.importorskip("ray")
    # RAY_ADDRESS=local: a fresh one-machine cluster owned by the server, even if another is running.
    log = serve_two_replicas(llama_dir, llm, "-dp", "2", "--distributed-executor-backend", "ray",
                             prelude="import os; os.environ['RAY_ADDRESS'] = 'local'")
    assert "Engine replica 0 runs as a Ray actor" in log and "Engine replica 1 runs as a Ray actor" in log


def test_ray_backend_without_ray_installed_is_a_clear_error(llama_dir):
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from pagedllm.entrypoints.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "serve", llama_dir, "--port", "0", "-dp", "2",
                           "--distributed-executor-backend", "ray"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "needs Ray" in proc.stderr and "pip install" in proc.stderr


def test_importing_pagedllm_never_imports_ray():
    code = ("import sys, pagedllm, pagedllm.entrypoints.openai.api_server, pagedllm.engine.core_client, "
            "pagedllm.executor.multiproc_executor, pagedllm.executor.ray_utils\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_each_gpu_replica_gets_its_own_devices():
    from pagedllm.engine.core_client import replica_devices

    gpus = ["0", "1", "2", "3"]
    assert [replica_devices(i, 2, gpus) for i in range(2)] == ["0,1", "2,3"]
    assert [replica_devices(i, 1, ["4", "6"]) for i in range(2)] == ["4", "6"]
    with pytest.raises(ValueError, match="only 4 are visible"):
        replica_devices(1, 3, gpus)
