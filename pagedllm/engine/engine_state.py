"""A snapshot of what the engine holds right now: KV blocks, queues, counters, recent history.

This is what `LLM.get_engine_state()` and the server's `GET /v1/engine/state` return, and what the
`/dashboard` page draws. The engine core takes it between two steps (`EngineCore.get_engine_state`)
from `KVCacheManager.snapshot()` and `Scheduler.snapshot()` (the block and queue types are in
`core/snapshot.py`), its `EngineStats` and the history of them, and the last few preemptions. It is
plain data: it pickles across the engine-core pipe, and `to_dict()` is its JSON. The frontend
fills in each sequence's `parent_id` (only it knows how it fanned an `n > 1` request out).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from pagedllm.core.snapshot import KVCacheState, RequestInfo
from pagedllm.engine.metrics import EngineStats


@dataclass
class PreemptionInfo:
    time: float  # time.time() when it happened
    request_id: str
    num_tokens: int  # tokens it will have to recompute


@dataclass
class EngineState:
    time: float  # time.time() when taken
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache: KVCacheState
    running: list[RequestInfo]  # in admission order (the newest is preempted first)
    waiting: list[RequestInfo]  # in admission order (preempted requests go to the front)
    counters: EngineStats
    recent_preemptions: list[PreemptionInfo]  # the last few, oldest first
    history: list[EngineStats] = field(default_factory=list)  # oldest first

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of `GET /v1/engine/state`."""
        return asdict(self)

    def with_parent_ids(self, parent_of: Callable[[str], str]) -> "EngineState":
        """The same snapshot with each sequence's user-request id filled in by the frontend."""
        def named(infos: list[RequestInfo]) -> list[RequestInfo]:
            return [replace(info, parent_id=parent_of(info.request_id)) for info in infos]

        return replace(self, running=named(self.running), waiting=named(self.waiting))


class StateHistory:
    """`EngineStats` sampled at most once per `interval` seconds, over the last `span` seconds.

    Sampled after engine steps and whenever a snapshot is taken, so while a dashboard watches,
    idle periods show as flat lines rather than gaps.
    """

    def __init__(self, interval: float = 1.0, span: float = 300.0) -> None:
        self.interval = interval
        self.samples: deque[EngineStats] = deque(maxlen=max(1, int(span / interval)))
        self._last = 0.0

    def maybe_record(self, take_stats: Callable[[], EngineStats], force: bool = False) -> None:
        """Append `take_stats()` if a sample is due (it is only called then)."""
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self.samples.append(take_stats())


class PreemptionLog:
    """The last few preemptions (a bounded log; preemptions are rare), for the dashboard."""

    def __init__(self, maxlen: int = 32) -> None:
        self.events: deque[PreemptionInfo] = deque(maxlen=maxlen)

    def record(self, request_id: str, num_tokens: int) -> None:
        self.events.append(PreemptionInfo(time.time(), request_id, num_tokens))
