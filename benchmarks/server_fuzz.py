"""The long run of the server's schema fuzzing (the suite runs a short one, `tests/test_server_fuzz.py`).

Starts `pagedllm serve` on 127.0.0.1 (the tiny random model of the tests by default, or --model),
loads its OpenAPI schema with schemathesis and sends each operation `--examples` generated requests,
valid and not, within `--time-limit` seconds in all. Every 5xx, hang (no answer within --call-timeout)
and transport error is recorded; at the end the server must answer a normal request, report healthy and
hold no KV block. Prints a table per operation and writes JSON under benchmarks/results/.

    python benchmarks/server_fuzz.py --examples 300 --time-limit 900
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
API_KEY = "fuzz-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(directory: Path) -> str:
    """The tests' tiny random Llama, built here (no hub)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import build_checkpoint

    return build_checkpoint(str(directory), "llama")


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli.main", "serve", model, "--port", str(port),
           "--api-key", API_KEY, "--max-model-len", "256", "--max-sequences-per-request", "8",
           "--max-prompts-per-request", "8", "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server did not start; see {log}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model to serve (default: the tests' tiny random Llama)")
    p.add_argument("--examples", type=int, default=300, help="generated requests per operation")
    p.add_argument("--time-limit", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--call-timeout", type=float, default=60, help="seconds a request may take before it is a hang")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    work = Path(tempfile.mkdtemp(prefix="pagedllm-fuzz-"))
    model = args.model or tiny_model(work / "tiny")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    proc = start_server(model, port, work / "server.log")
    deadline = time.monotonic() + args.time_limit
    statuses: dict[str, Counter] = {}
    failures: list[dict] = []
    try:
        api = schemathesis.openapi.from_url(base + "/openapi.json", headers=headers)
        operations = [result.ok() for result in api.get_all_operations()]
        runs = [(op, mode) for op in operations for mode in schemathesis.GenerationMode]
        for index, (operation, mode) in enumerate(runs):
            counts = statuses.setdefault(operation.label, Counter())
            budget = args.examples

            # Bodies the schema allows (positive), then bodies it does not (negative).
            @settings(max_examples=budget, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy(mode))
            def send(case) -> None:
                if time.monotonic() > deadline:
                    return
                try:
                    response = case.call(headers=headers, timeout=args.call_timeout)
                except Exception as e:  # noqa: BLE001 - a hang or a dropped connection is a finding
                    counts[type(e).__name__] += 1
                    failures.append({"operation": operation.label, "error": repr(e)[:300]})
                    return
                counts[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append({"operation": operation.label, "status": response.status_code,
                                     "body": response.text[:300]})

            try:
                send()
            except Unsatisfiable:  # no request breaks the schema of an operation that takes no input
                pass
            print(f"[fuzz] {index + 1}/{len(runs)} {operation.label} ({mode.value}): {dict(counts)}", flush=True)
        after = httpx.post(base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, headers=headers,
                           timeout=60)
        healthy = httpx.get(base + "/health", timeout=10).status_code == 200
        usage = None
        for _ in range(100):
            text = httpx.get(base + "/metrics", timeout=10).text
            usage = sum(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith("pagedllm:kv_cache_usage_perc{"))
            if usage == 0:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    print(f"\n{'operation':<36}{'requests':>10}  statuses")
    for label, counts in statuses.items():
        print(f"{label:<36}{sum(counts.values()):>10}  {dict(sorted(counts.items(), key=str))}")
    ok = not failures and after.status_code == 200 and healthy and usage == 0
    print(f"\n5xx / hangs / transport errors: {len(failures)}; afterwards: normal request {after.status_code}, "
          f"/health {'200' if healthy else 'not 200'}, KV-cache usage {usage}  ->  {'PASS' if ok else 'FAIL'}")
    stamp = datetime.now(timezone.utc)
    out = Path(args.output_json) if args.output_json else (
        HERE / "results" / f"server_fuzz-{stamp:%Y%m%d-%H%M}-{platform.node()}.json")
    out.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "args": vars(args),
                               "statuses": {k: {str(s): n for s, n in v.items()} for k, v in statuses.items()},
                               "failures": failures, "after_status": after.status_code, "healthy": healthy,
                               "kv_cache_usage_after": usage, "pass": ok}, indent=2))
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
