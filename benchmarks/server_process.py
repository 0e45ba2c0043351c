"""`pagedllm serve` as a benchmark's subject: started on a free port of 127.0.0.1, waited for, stopped.

The server benchmarks (`server_frontend.py`, `server_fuzz.py`, `server_soak.py`) all need the same
things around their measurements: a port nobody holds, the tests' tiny random model when none is
given (no hub), the server in its own session with its log in a file, a wait for /health that gives
up as soon as the process exits, and, afterwards, the engine's gauges from /metrics once it is idle.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(directory: str | Path) -> str:
    """The tests' tiny random Llama (`tests/conftest.py`), written into `directory`."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import build_checkpoint

    return build_checkpoint(str(directory), "llama")


def start_server(serve_args: list[str], log: str | Path, env: dict[str, str] | None = None,
                 timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`pagedllm serve *serve_args` on a free port, its output in `log`; (process, base URL) once
    /health answers 200. Raises RuntimeError if it exits or is not healthy within `timeout`."""
    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli.main", "serve", *serve_args, "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server was not healthy within {timeout:g} s; see {log}")


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM (the server's graceful shutdown), then SIGKILL if it has not exited in `timeout` s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def idle_metrics(url: str, timeout: float = 20.0) -> dict[str, float]:
    """The engine's `pagedllm:` gauges and counters (summed over data-parallel replicas) once no
    request runs and no KV block is held, or as they are when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        values: dict[str, float] = {}
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("pagedllm:") and "{" in line:
                name = line.split("{")[0]
                values[name] = values.get(name, 0.0) + float(line.split()[-1])
        idle = values.get("pagedllm:kv_cache_usage_perc") == 0 and values.get("pagedllm:num_requests_running") == 0
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.1)
