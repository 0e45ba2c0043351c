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
import platform
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
from server_process import HERE, idle_metrics, start_server, stop_server, tiny_model

API_KEY = "fuzz-key"


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
    headers = {"Authorization": f"Bearer {API_KEY}"}
    proc, base = start_server(
        [model, "--api-key", API_KEY, "--max-model-len", "256", "--max-sequences-per-request", "8",
         "--max-prompts-per-request", "8", "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"],
        work / "server.log", env={"OMP_NUM_THREADS": "1"})
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
        usage = idle_metrics(base).get("pagedllm:kv_cache_usage_perc")
    finally:
        stop_server(proc)

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
