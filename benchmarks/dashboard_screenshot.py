"""Screenshot `/dashboard` of a real `pagedllm serve` with requests in flight (docs/images/dashboard.png).

Not a benchmark: it sits with the other scripts that drive the real server. It starts the server
(default model unless --model), sends chat requests that share a system prompt (prefix-cache hits),
one with n=2 (shared blocks), more than the KV cache holds at once (preemptions), watches the page
in Debian's headless chromium for a while so the charts have a history, and saves a screenshot.

    python benchmarks/dashboard_screenshot.py --output docs/images/dashboard.png
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx

SYSTEM = ("You are a concise assistant. Answer in plain sentences, without lists, and explain the idea "
          "behind the answer so that a student could follow it.")
QUESTIONS = [
    "Why does a paged KV cache waste less memory than a contiguous one?",
    "What is continuous batching?",
    "Explain prefix caching in two sentences.",
    "Why would a scheduler preempt a request?",
    "What does the attention mechanism compute?",
    "Name three primary colours and say why they are called primary.",
    "What is the capital of France, and what is it known for?",
    "Write a short poem about memory blocks.",
]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="docs/images/dashboard.png")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--num-blocks", type=int, default=40,
                   help="--num-gpu-blocks-override for the server: small, so that the load preempts")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument("--watch", type=float, default=75.0, help="seconds to watch before the screenshot")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()

    base = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli.main", "serve", *([args.model] if args.model else []),
           "--port", str(args.port), "--max-model-len", str(args.max_model_len), "--num-gpu-blocks-override", str(args.num_blocks),
           "--disable-uvicorn-access-log", "--shutdown-timeout", "1"]
    server = subprocess.Popen(cmd, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]

        def ask(question: str, n: int = 1) -> None:
            body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0.7, "seed": 0, "n": n,
                    "ignore_eos": True,
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
            httpx.post(base + "/v1/chat/completions", json=body, timeout=600)

        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            context = pw.chromium.launch_persistent_context(profile, executable_path=args.chromium, headless=True,
                                                            args=ARGS, viewport={"width": 1400, "height": 900},
                                                            device_scale_factor=1)
            page = context.new_page()
            page.goto(base + "/dashboard")
            threads = [threading.Thread(target=ask, args=(q, 2 if i == 0 else 1), daemon=True)
                       for i, q in enumerate(QUESTIONS)]
            for i, t in enumerate(threads):
                t.start()
                time.sleep(1.5 if i < 4 else 3.0)  # arrivals spread out, as a server sees them
            time.sleep(max(0.0, args.watch - 16.5))
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            page.screenshot(path=args.output, full_page=True)
            print(f"saved {args.output}")
            context.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
