"""The request trace: one log line per scheduler decision and per block handed out or taken back.

Switched on by `trace=True` (`--trace` on the command line; `PAGEDLLM_TRACE=1` is its default,
read when the engine arguments are made). Lines go to
the `pagedllm.trace` logger at INFO, whatever `PAGEDLLM_LOGGING_LEVEL` says, and every line starts
with `req=<id>`, so `grep 'req=cmpl-42'` follows one request through the system:

    req=cmpl-42 added: prompt 40 tokens, max_tokens 16
    req=cmpl-42 admitted: 2 cached blocks (32 tokens) shared [3, 4]; chunk of 8 tokens at 32; given [9]
    req=cmpl-42 decode at 48: given [12]
    req=cmpl-42 preempted: released [12, 9, 4, 3] (3 stay cached); 49 tokens to recompute
    req=cmpl-42 resumed: 3 cached blocks (48 tokens) shared [3, 4, 9]; chunk of 1 token at 48; given [5]
    req=cmpl-42 finished (length): 16 tokens generated, 1 preemption(s); released [5, 9, 4, 3] (4 stay cached)

A decode that fits in the request's last block is not logged (one line per token would drown the
rest); the `finished` line counts the tokens. When the trace is off the scheduler holds a
`RequestTracer`, whose methods do nothing: each call site costs one empty method call, and the
scheduler has no branch for it.
"""

from __future__ import annotations

import logging
from typing import Sequence

from pagedllm.core.block_pool import KVCacheBlock
from pagedllm.request import Request
from pagedllm.logger import init_logger

TRACE_LOGGER = "pagedllm.trace"


def make_tracer(enabled: bool) -> "RequestTracer":
    return LoggingTracer() if enabled else RequestTracer()


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _blocks(n: int) -> str:
    return f"{n} cached block" if n == 1 else f"{n} cached blocks"


def _ids(blocks: Sequence[KVCacheBlock]) -> str:
    return "[" + ", ".join(str(b.block_id) for b in blocks) + "]"


def _released(blocks: Sequence[KVCacheBlock]) -> str:
    """Block ids in release order, and how many stay findable in the prefix cache."""
    text = _ids(blocks)
    kept = sum(1 for b in blocks if b.block_hash is not None)
    return f"{text} ({kept} stay cached)" if kept else text


class RequestTracer:
    """The scheduler's decisions about one request, as events; this base class ignores them."""

    def added(self, request: Request) -> None:
        """A request joined the waiting queue."""

    def admitted(self, request: Request, hits: Sequence[KVCacheBlock], num_hit_tokens: int, num_new: int,
                 given: Sequence[KVCacheBlock], resumed: bool) -> None:
        """A waiting request got blocks and its first chunk; `resumed` if it had been preempted."""

    def scheduled(self, request: Request, num_new: int, given: Sequence[KVCacheBlock]) -> None:
        """A running request's step (a prefill chunk, a recompute, or a decode)."""

    def preempted(self, request: Request, released: Sequence[KVCacheBlock]) -> None:
        """A running request lost its blocks to make room; it will be recomputed."""

    def finished(self, request: Request, released: Sequence[KVCacheBlock]) -> None:
        """A request ended (its status says how) and gave its blocks back."""


class LoggingTracer(RequestTracer):
    """Formats the scheduler's decisions about each request into `pagedllm.trace` lines."""

    def __init__(self) -> None:
        init_logger(TRACE_LOGGER)  # the pagedllm handler and format
        self.logger = logging.getLogger(TRACE_LOGGER)
        # Its own level, so that a quiet PAGEDLLM_LOGGING_LEVEL does not hide a trace asked for.
        self.logger.setLevel(logging.INFO)

    def _log(self, request_id: str, message: str) -> None:
        self.logger.info("req=%s %s", request_id, message)

    def added(self, request: Request) -> None:
        self._log(request.request_id,
                  f"added: prompt {request.num_prompt_tokens} tokens, max_tokens {request.max_tokens}")

    def admitted(self, request: Request, hits: Sequence[KVCacheBlock], num_hit_tokens: int, num_new: int,
                 given: Sequence[KVCacheBlock], resumed: bool) -> None:
        cached = f"{_blocks(len(hits))} ({_tokens(num_hit_tokens)})"
        if hits:
            cached += f" shared {_ids(hits)}"
        self._log(request.request_id,
                  f"{'resumed' if resumed else 'admitted'}: {cached}; chunk of {_tokens(num_new)} at "
                  f"{num_hit_tokens}; given {_ids(given)}")

    def scheduled(self, request: Request, num_new: int, given: Sequence[KVCacheBlock]) -> None:
        """Logged for chunks (prefill, recompute), and for decodes that took a block."""
        start = request.num_computed_tokens
        if num_new > 1 or start < request.num_prompt_tokens:
            self._log(request.request_id, f"chunk of {_tokens(num_new)} at {start}; given {_ids(given)}")
        elif given:
            self._log(request.request_id, f"decode at {start}: given {_ids(given)}")

    def preempted(self, request: Request, released: Sequence[KVCacheBlock]) -> None:
        self._log(request.request_id,
                  f"preempted: released {_released(released)}; {request.num_tokens} tokens to recompute")

    def finished(self, request: Request, released: Sequence[KVCacheBlock]) -> None:
        reason = request.status.finish_reason or request.status.name.lower()
        self._log(request.request_id,
                  f"finished ({reason}): {request.num_output_tokens} tokens generated, "
                  f"{request.num_preemptions} preemption(s); released {_released(released)}")
