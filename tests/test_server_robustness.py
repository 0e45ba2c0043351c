"""The server under failure: a request that breaks a step, an engine that dies, an engine process that
is killed, shutdown signals, a taken port. Each runs a real `pagedllm serve` on the tiny Llama;
faults are injected into the real engine by patching the model runner inside the server process.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_server_harness import RemoteServer, free_port, sse_events

PROMPT = "The capital of France is"

# Runs in the server process before the CLI: requests with these seeds break the model runner.
FAULTS = """
from pagedllm.worker.model_runner import ModelRunner

class InjectedFatalError(BaseException):
    pass

_execute_model = ModelRunner.execute_model

def _execute_model_with_faults(self, scheduler_output):
    seeds = {s.sampling_params.seed for s in scheduler_output.scheduled}
    if 4242 in seeds:
        raise RuntimeError("injected fault: this request breaks the step")
    if 4343 in seeds:
        raise InjectedFatalError("injected fault: the engine itself breaks")
    return _execute_model(self, scheduler_output)

ModelRunner.execute_model = _execute_model_with_faults
"""


def completion(server: RemoteServer, timeout: float = 60.0, **fields) -> httpx.Response:
    return server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **fields},
                       timeout=timeout)


def stream_events(server: RemoteServer, **fields) -> tuple[int, list]:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True, **fields}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, headers=server.headers, timeout=60) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        return r.status_code, sse_events(r)


@pytest.fixture(scope="module")
def faulty_server(llama_dir):
    # The faults are patched into this process, so the engine loop must run here: a thread.
    server = RemoteServer(llama_dir, "--max-model-len", "512", "--engine-core", "thread", prelude=FAULTS)
    yield server
    server.stop()


def test_a_request_that_breaks_a_step_gets_a_500_and_the_engine_carries_on(faulty_server):
    server = faulty_server
    r = completion(server, seed=4242)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "injected fault" in r.json()["error"]["message"]
    status, events = stream_events(server, seed=4242)
    assert status == 200 and events[-1] == "[DONE]" and "injected fault" in events[-2]["error"]["message"]
    assert httpx.get(server.url("/health")).status_code == 200
    assert completion(server).status_code == 200
    metrics = server.wait_idle()
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0 and metrics["pagedllm:engine_healthy"] == 1


def run_together(server: RemoteServer, bodies: dict[str, dict], stagger: float = 0.0) -> dict[str, httpx.Response]:
    """Send every body at once (one thread each; `stagger` seconds apart), return the answers by name."""
    results: dict[str, httpx.Response] = {}

    def send(name: str, body: dict) -> None:
        results[name] = server.post("/v1/completions", body, timeout=180)

    threads = []
    for name, body in bodies.items():
        threads.append(threading.Thread(target=send, args=(name, body)))
        threads[-1].start()
        time.sleep(stagger)
    for thread in threads:
        thread.join()
    return results


HEALTHY = {f"healthy-{i}": {"prompt": f"Story number {i}: once upon a time", "max_tokens": 40, "temperature": 0,
                            "ignore_eos": True} for i in range(4)}


def check_healthy_answers(results: dict[str, httpx.Response], llm) -> None:
    """Every healthy request finished in full, with the greedy text the offline engine gives."""
    from pagedllm import SamplingParams

    expected = llm.generate([b["prompt"] for b in HEALTHY.values()],
                            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    for name, want in zip(HEALTHY, expected):
        r = results[name]
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 40
        assert r.json()["choices"][0]["text"] == want.outputs[0].text


def test_requests_that_break_steps_fail_alone_amid_healthy_streams(faulty_server, llm):
    """Three requests that break every step they are in, sent while four healthy ones decode: the step
    that fails is run again one request at a time, each culprit fails alone with a 500, and the
    healthy requests finish with the answers they would have had."""
    server = faulty_server
    bad = {f"bad-{i}": {"prompt": PROMPT, "max_tokens": 8, "seed": 4242} for i in range(3)}
    results = run_together(server, {**HEALTHY, **bad}, stagger=0.05)
    check_healthy_answers(results, llm)
    for name in bad:
        assert results[name].status_code == 500 and "injected fault" in results[name].json()["error"]["message"]
    assert "one at a time to find the cause" in server.read_log()  # the isolation ran, not luck
    assert httpx.get(server.url("/health")).status_code == 200
    metrics = server.wait_idle()
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0 and metrics["pagedllm:engine_healthy"] == 1


def test_a_dead_engine_fails_requests_fast_and_health_says_so(faulty_server):
    server = faulty_server
    in_flight = completion(server, seed=4343)
    assert in_flight.status_code == 503 and in_flight.json()["error"]["code"] == "engine_dead"
    assert httpx.get(server.url("/health")).status_code == 503
    start = time.monotonic()
    for r in (completion(server), completion(server, stream=True),
              server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert time.monotonic() - start < 5
    assert server.metrics()["pagedllm:engine_healthy"] == 0
    state = httpx.get(server.url("/v1/engine/state"), headers=server.headers, timeout=10)
    assert state.status_code == 503 and state.json()["error"]["code"] == "engine_dead"
    assert server.proc.poll() is None  # still up, answering, for an orchestrator to restart


# ----- the engine core in its own process ---------------------------------------------------------
@pytest.fixture(scope="module")
def process_server(llama_dir):
    server = RemoteServer(llama_dir, "--max-model-len", "512", "--engine-core", "process",
                          "--allowed-origins", '["http://example.com"]',
                          "--chat-template", "{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    yield server
    server.stop()


def test_an_out_of_range_integer_is_a_400_and_hurts_nobody(process_server, llm):
    """top_k = 2**70 once passed validation and failed the whole batch while its sampling tensors were
    built; three of them amid healthy streams took the engine down. Now each is a 400 naming the field."""
    bad = {f"bad-{i}": {"prompt": PROMPT, "max_tokens": 2, "temperature": 1, "top_k": 1180591620717411303424}
           for i in range(3)}
    results = run_together(process_server, {**HEALTHY, **bad}, stagger=0.05)
    check_healthy_answers(results, llm)
    for name in bad:
        assert results[name].status_code == 400 and results[name].json()["error"]["param"] == "top_k"
    assert httpx.get(process_server.url("/health")).status_code == 200


def test_the_engine_core_process_serves_the_same_answers(process_server, llm):
    from pagedllm import SamplingParams

    expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    assert completion(process_server).json()["choices"][0]["text"] == expected
    status, events = stream_events(process_server)
    assert status == 200 and "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    metrics = process_server.wait_idle()
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0 and metrics["pagedllm:generation_tokens_total"] >= 16


def test_chat_template_flag_and_cors(process_server):
    count = process_server.post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()["count"]
    assert count == process_server.post("/tokenize", {"prompt": "hi|", "add_special_tokens": False}).json()["count"]
    preflight = httpx.options(process_server.url("/v1/completions"), headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://example.com"
    other = httpx.get(process_server.url("/health"), headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_a_killed_engine_process_turns_health_unhealthy(process_server):
    engines = [pid for pid in process_server.child_pids()
               if b"resource_tracker" not in open(f"/proc/{pid}/cmdline", "rb").read()]
    assert len(engines) == 1
    subprocess.run(["kill", "-KILL", str(engines[0])], check=True)
    deadline = time.monotonic() + 20
    while httpx.get(process_server.url("/health")).status_code != 503:
        assert time.monotonic() < deadline, "health never turned unhealthy"
        time.sleep(0.1)
    r = completion(process_server)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    state = httpx.get(process_server.url("/v1/engine/state"), headers=process_server.headers, timeout=10)
    assert state.status_code == 503 and state.json()["error"]["code"] == "engine_dead"


# ----- shutdown -------------------------------------------------------------------------------------
def _stream_in_background(server: RemoteServer, body: dict) -> tuple[threading.Thread, dict]:
    """Start a streaming request; `result` gets its events once it ends, `started` is set at the first."""
    result: dict = {"started": threading.Event()}

    def run() -> None:
        events = []
        try:
            with httpx.stream("POST", server.url("/v1/completions"), json=body, headers=server.headers,
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        payload = line[6:]
                        events.append(payload if payload == "[DONE]" else json.loads(payload))
                        result["started"].set()
        except httpx.HTTPError as e:
            result["error"] = e
        result["events"] = events
        result["started"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert result["started"].wait(60)
    return thread, result


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_lets_requests_in_flight_finish(llama_dir, sig):
    server = RemoteServer(llama_dir, "--max-model-len", "512")
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "n": 2, "temperature": 1.0, "stream": True}
    thread, result = _stream_in_background(server, body)
    server.proc.send_signal(sig)
    thread.join(60)
    code = server.stop(timeout=60)
    events = result["events"]
    assert events[-1] == "[DONE]", result
    finished = [e["choices"][0] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(c["finish_reason"] for c in finished) == ["length", "length"]
    assert code in (0, -signal.SIGTERM, 130, -signal.SIGINT), server.read_log()
    assert "Traceback" not in server.read_log() and "ERROR" not in server.read_log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url("/health"), timeout=2)


def test_shutdown_fails_requests_still_running_at_the_deadline(llama_dir):
    server = RemoteServer(llama_dir, "--max-model-len", "512", "--shutdown-timeout", "0.2")
    body = {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "n": 8, "temperature": 1.0, "stream": True}
    thread, result = _stream_in_background(server, body)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(60)
    code = server.stop(timeout=60)
    events = result["events"]
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] is None, result
    assert "shutting down" in events[-2]["error"]["message"]
    assert code in (0, -signal.SIGTERM), server.read_log()


# ----- the command line ---------------------------------------------------------------------------------
def test_a_taken_port_fails_at_once_with_one_error_line(llama_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli.main", "serve", llama_dir,
                                 "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert any(line.startswith("error: cannot listen on 127.0.0.1") for line in result.stderr.splitlines())


def test_a_second_server_on_the_same_port_exits_at_once_and_the_first_serves(llama_dir):
    """Started while the first is still loading its model: both used to bind (SO_REUSEADDR), and the
    second hung at listen() with its engine process alive. The first now listens as it binds."""
    first = subprocess.Popen([sys.executable, "-m", "pagedllm.entrypoints.cli.main", "serve", llama_dir, "--port",
                              str(port := free_port()), "--max-model-len", "256"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the port is claimed before the model is loaded
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli.main", "serve", llama_dir,
                                 "--port", str(port)], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and time.monotonic() - start < 30
        assert "Traceback" not in second.stderr
        assert any(line.startswith("error: cannot listen on 127.0.0.1") for line in second.stderr.splitlines())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200, r.text
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)


def test_serve_help_names_the_default_bind_address():
    result = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli.main", "serve", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "127.0.0.1" in result.stdout
    for flag in ("--served-model-name", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                 "--enable-prefix-caching", "--no-enable-prefix-caching", "--dtype", "--num-gpu-blocks-override",
                 "--api-key", "--chat-template", "--allowed-origins", "--uvicorn-log-level"):
        assert flag in result.stdout, flag


# ----- bounded work per request -------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited_server(llama_dir):
    server = RemoteServer(llama_dir, "--max-model-len", "256", "--max-request-body-bytes", "9000000",
                          "--request-body-timeout-s", "1", "--request-head-timeout-s", "1",
                          "--trust-request-chat-template")
    yield server
    server.stop()


def health_while(server: RemoteServer, path: str, body: dict) -> tuple[list[httpx.Response], list[float]]:
    """Send `body` in the background and time /health every 0.1 s while it is being served."""
    results: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: results.append(server.post(path, body, timeout=120)))
    thread.start()
    time.sleep(0.3)
    latencies = []
    while thread.is_alive() and len(latencies) < 20:
        start = time.monotonic()
        assert httpx.get(server.url("/health"), timeout=10).status_code == 200
        latencies.append(time.monotonic() - start)
        time.sleep(0.1)
    thread.join()
    return results, latencies


def test_a_body_over_the_limit_is_a_413_declared_or_streamed(limited_server):
    server = limited_server
    big = json.dumps({"prompt": "x" * 9_100_000}).encode()
    r = server.post("/v1/completions", big)
    assert r.status_code == 413 and "--max-request-body-bytes" in r.json()["error"]["message"]
    assert r.headers["connection"] == "close"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1_000_000
    streamed = httpx.post(server.url("/v1/completions"), content=chunks(), timeout=60,
                          headers={**server.headers, "Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert completion(server).status_code == 200


def test_a_stalled_body_gets_a_408_and_a_stalled_head_is_closed(limited_server):
    server = limited_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + server.api_key.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"pro")
        answer = s.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    # A byte every 0.2 s never stalls for the 1 s timeout, yet the whole body is late: 408 all the same.
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + server.api_key.encode() + b"\r\nContent-Length: 100\r\n\r\n")
        s.settimeout(0.2)
        answer = b""
        while not answer and time.monotonic() - start < 8:
            try:
                s.sendall(b" ")
                answer = s.recv(65536)
            except TimeoutError:
                continue
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 3, answer
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        assert s.recv(1024) == b""  # closed by the server
    assert time.monotonic() - start < 5


def test_tokenizing_a_huge_prompt_does_not_block_other_requests(limited_server):
    """The tokenizer runs off the event loop: /health answers at once while an 8 MB prompt is encoded
    (it then gets its 400: far longer than the context)."""
    server = limited_server
    results, latencies = health_while(server, "/v1/completions", {"prompt": "lorem ipsum " * 700_000, "max_tokens": 2})
    assert results[0].status_code == 400 and results[0].json()["error"]["code"] == "context_length_exceeded"
    assert latencies and max(latencies) < 1.0, latencies


def test_a_slow_trusted_template_renders_off_the_event_loop_and_a_huge_one_is_refused(limited_server):
    """Templates are rendered in a worker thread: /health answers while nested loops run; a rendering
    longer than any prompt could tokenize into is a 400 before the tokenizer sees it."""
    server = limited_server
    slow = ("{% for i in range(3000) %}{% for j in range(3000) %}{% if (i ~ j) == '-1' %}y{% endif %}{% endfor %}"
            "{% endfor %}{{ messages[0]['content'] }}")  # about 3 s of Python
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template": slow}
    results, latencies = health_while(server, "/v1/chat/completions", body)
    assert results[0].status_code == 200, results[0].text
    assert latencies and max(latencies) < 1.0, latencies
    huge = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "chat_template": "{% for i in range(100000) %}{{ 'lorem ipsum ' }}{% endfor %}"}
    r = server.post("/v1/chat/completions", huge)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
