"""See inside the running engine: `GET /v1/engine/state` (JSON) and `GET /dashboard` (the page that draws it).

The state is taken by the engine loop itself (a `GetEngineState` command through the same channel
as requests and aborts), so it is consistent: the blocks, block tables and queues of one moment,
between two steps. The page is one static HTML file with its script inline (no build step, no
CDN, so it works offline); it polls the state endpoint about twice a second.

With `--api-key`, `/dashboard` itself stays open (it holds no data), while `/v1/engine/state`
needs the key like every `/v1` route: the page reads it from its address (`/dashboard#api_key=KEY`;
a fragment is never sent to the server, so the key stays out of access logs) or asks for it.
With data parallelism (`-dp M`) each replica has its own KV cache: `?engine=i` picks one (default 0),
and the answer says how many there are (`data_parallel_size`).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response

from pagedllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from pagedllm.entrypoints.openai.errors import from_engine_error

DASHBOARD_PATH = "/dashboard"
ENGINE_STATE_PATH = "/v1/engine/state"


@lru_cache(maxsize=1)
def dashboard_html() -> str:
    """The page, read from the installed package (it is package data, see pyproject.toml)."""
    return resources.files("pagedllm.entrypoints.openai").joinpath("static", "dashboard.html").read_text("utf-8")


def add_dashboard_routes(app: FastAPI, engine: AsyncLLM, model_name: str) -> None:
    @app.get(ENGINE_STATE_PATH)
    async def engine_state(engine_index: int = Query(0, alias="engine")) -> Response:
        try:
            state = await engine.get_engine_state(engine_index)
        except (RequestFailedError, EngineDeadError) as e:
            raise from_engine_error(e) from e
        return JSONResponse({"model": model_name, "engine": engine_index,
                             "data_parallel_size": engine.data_parallel_size, **state.to_dict()},
                            headers={"Cache-Control": "no-store"})

    @app.get(DASHBOARD_PATH)
    async def dashboard() -> Response:
        return HTMLResponse(dashboard_html(), headers={"Cache-Control": "no-cache"})
