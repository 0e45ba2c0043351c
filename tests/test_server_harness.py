"""`RemoteServer`: a real `pagedllm serve` process on 127.0.0.1, for the server tests (no tests here).

The server runs as a user runs it, in its own process, with torch on one thread; its log goes to a
file that a failing test prints. `prelude` runs Python in the server process before the CLI starts,
which is how the robustness tests inject faults into a real engine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import httpx

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    def __init__(self, model: Optional[str], *args: str, api_key: Optional[str] = API_KEY,
                 prelude: Optional[str] = None, startup_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{self.port}"
        serve_args = ["serve"] + ([model] if model else []) + [
            "--port", str(self.port), "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log", *args]
        if api_key:
            serve_args += ["--api-key", api_key]
        code = (prelude or "") + "\nimport sys\nfrom pagedllm.entrypoints.cli.main import main\n" \
            "sys.exit(main(sys.argv[1:]))\n"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PAGEDLLM_LOGGING_LEVEL": "INFO",
               "TOKENIZERS_PARALLELISM": "false"}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagedllm-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-c", code, *serve_args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server was not healthy within {timeout} s:\n{self.read_log()}")

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none", max_retries=0,
                             timeout=kwargs.pop("timeout", 120.0), **kwargs)

    def async_client(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none", max_retries=0,
                                  timeout=kwargs.pop("timeout", 120.0), **kwargs)

    def post(self, path: str, body, timeout: float = 60.0, **kwargs) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        if isinstance(body, (bytes, str)):
            return httpx.post(self.url(path), content=body, headers={"Content-Type": "application/json", **headers},
                              timeout=timeout, **kwargs)
        return httpx.post(self.url(path), json=body, headers=headers, timeout=timeout, **kwargs)

    def metrics(self) -> dict[str, float]:
        """`/metrics` as {name: value}, summed over label sets (histograms keep their _sum/_count)."""
        text = httpx.get(self.url("/metrics"), timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)$", line)
            if m:
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
        return values

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """Wait until no request runs or waits and no KV block is in use; return the metrics then."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m.get("pagedllm:num_requests_running") == 0 and m.get("pagedllm:num_requests_waiting") == 0
                    and m.get("pagedllm:kv_cache_usage_perc") == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def read_log(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode

    def child_pids(self) -> list[int]:
        """The server's child processes (Linux /proc)."""
        pids = []
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        return pids


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a Server-Sent Events response, JSON-decoded except `[DONE]`."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
