"""`/dashboard` in a real headless browser: Debian's chromium, driven by Playwright.

The page is loaded from a real `pagedllm serve` (tiny Llama, API key set). It must load with no
console errors, draw one grid cell per KV block, and change while a request runs, then go back to
free/cached blocks when it ends. A screenshot is taken mid-request (into the test's tmp dir, and
to `$PAGEDLLM_DASHBOARD_SCREENSHOT` if set).

Locally the test skips when chromium or playwright is missing; under CI (`CI=true`, where
`.ci/run` installs both) it fails instead, so a broken set-up can never pass silently.
`$PAGEDLLM_CHROMIUM` points it at another chromium binary (default: `chromium` on the PATH).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_engine_state import SLOW_STEPS
from test_server_harness import API_KEY, RemoteServer

CHROMIUM = os.environ.get("PAGEDLLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NUM_BLOCKS = 48

# Each cell's class names, in block order: the grid as the page draws it.
GRID = "() => Array.from(document.querySelectorAll('#kv-grid .b'), c => c.className).join(',')"
HELD = "() => document.querySelectorAll('#kv-grid .b.used, #kv-grid .b.shared').length"
UPDATES = "() => Number(document.body.dataset.updates || 0)"


def missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the browser test, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 950})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def server(llama_dir):
    # Slowed-down steps (so that a request lasts seconds) need the engine loop in the server process.
    s = RemoteServer(llama_dir, "--max-model-len", "384", "--num-gpu-blocks-override", str(NUM_BLOCKS),
                     "--engine-core", "thread", prelude=SLOW_STEPS)
    try:
        yield s
    finally:
        assert s.stop() in (0, -15), s.read_log()


def open_page(context, url: str):
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    return page, problems


def wait_js(page, expression: str, predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            status = page.locator("#status").inner_text()
            raise AssertionError(f"{expression} never matched; last value {value!r}; page status {status!r}")
        time.sleep(0.1)


def test_dashboard_shows_the_grid_and_follows_a_running_request(browser_context, server, tmp_path):
    page, problems = open_page(browser_context, server.url(f"/dashboard#api_key={API_KEY}"))
    wait_js(page, UPDATES, lambda n: n >= 2)
    assert "api_key" not in page.url  # taken off the address bar
    assert page.locator("#kv-grid .b").count() == NUM_BLOCKS
    assert page.locator("#status").get_attribute("class") == "ok"
    idle_grid = page.evaluate(GRID)
    assert "used" not in idle_grid and "shared" not in idle_grid

    prompt = "Prefix caching shares blocks between prompts with the same beginning. " * 2
    body = {"prompt": prompt, "max_tokens": 300, "n": 2, "ignore_eos": True, "temperature": 1.0, "seed": 1}
    result: list[httpx.Response] = []
    request = threading.Thread(target=lambda: result.append(server.post("/v1/completions", body, timeout=120)))
    request.start()
    try:
        wait_js(page, HELD, lambda n: n > 0)
        running_grid = page.evaluate(GRID)
        assert running_grid != idle_grid and "shared" in running_grid  # n=2 shares its prompt's blocks
        # Hovering a block names the requests that hold it.
        page.locator("#kv-grid .b.shared").first.hover(timeout=5_000)
        info = page.locator("#block-info").inner_text()
        assert "shared" in info and "held by" in info and "_cmpl-" in info, info
        wait_js(page, "() => document.querySelectorAll('#running tr').length", lambda n: n == 3)  # header + 2
        later = wait_js(page, GRID, lambda g: g != running_grid)  # the grid moves as tokens are generated
        assert later != idle_grid
        shot = page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
        if os.environ.get("PAGEDLLM_DASHBOARD_SCREENSHOT"):
            Path(os.environ["PAGEDLLM_DASHBOARD_SCREENSHOT"]).write_bytes(shot)
    finally:
        request.join()
    assert result[0].status_code == 200, result[0].text
    wait_js(page, HELD, lambda n: n == 0)  # every block free or cached again
    assert "cached" in page.evaluate(GRID)
    assert page.locator("#summary").inner_text().count("\n") > 0
    assert problems == []
    page.close()


def test_dashboard_asks_for_the_key_when_it_has_none(browser_context, server):
    page, _ = open_page(browser_context, server.url("/dashboard"))  # the 401 it meets is a console error
    page.wait_for_selector("#auth.show", timeout=15_000)
    assert page.locator("#kv-grid .b").count() == 0
    page.fill("#auth-key", API_KEY)
    page.click("#auth button")
    wait_js(page, UPDATES, lambda n: n >= 1)
    assert page.locator("#kv-grid .b").count() == NUM_BLOCKS
    assert not page.locator("#auth.show").count()
    page.close()
