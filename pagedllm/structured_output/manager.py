"""`StructuredOutputManager`: the engine core's side of structured outputs, as in vLLM v1.

- A request with a constraint gets its grammar compiled on a worker thread; compiled grammars are
  cached by (kind, spec), so the n sequences of one request, and every later request with the same
  schema, share one compilation. Until its grammar is ready a request stays in the waiting queue
  and the scheduler admits the requests behind it (`Scheduler.schedule`): a slow schema never
  blocks anyone else.
- Each step the scheduler asks for one bitmask covering the step's constrained rows
  (`grammar_bitmask`); it travels to the runner inside `SchedulerOutput`, and the sampler masks the
  logits with it before anything else (`sample/sampler.py`).
- Each sampled token advances the request's grammar (`accept_token`). A preempted request keeps its
  output tokens, and so its place in the grammar: recomputing its KV changes nothing the grammar saw.

The tokenizer and the grammar engine are loaded on the first constrained request: an engine that
never sees one never pays for them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Optional

import numpy as np

from pagedllm.logger import init_logger
from pagedllm.request import Request
from pagedllm.structured_output.request import StructuredOutputRequest

logger = init_logger(__name__)

BACKENDS = ("auto", "xgrammar")
# Compiled grammars kept for reuse (least recently used dropped first); xgrammar keeps its own cache too.
MAX_CACHED_GRAMMARS = 512


class StructuredOutputManager:
    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {list(BACKENDS)}, got {backend!r}")
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._backend: Any = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self.last_compile_seconds = 0.0

    # ----- requests -----------------------------------------------------------------
    def grammar_init(self, request: Request) -> None:
        """Start compiling the request's constraint (or reuse the compilation of an equal one)."""
        params = request.sampling_params.structured_outputs
        if params is None:
            return
        from pagedllm.structured_output.backend_xgrammar import grammar_spec

        kind, spec = grammar_spec(params)
        so_request = StructuredOutputRequest(kind, spec, sorted(request.sampling_params.all_stop_token_ids),
                                             request.reasoning_end_token_id)
        key = (kind, spec)
        if key in self._compiled:
            self._compiled.move_to_end(key)
        else:
            self._compiled[key] = self._pool().submit(self._compile, key)
            if len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        so_request.compiled = self._compiled[key]
        request.structured_output_request = so_request

    def is_ready(self, request: Request) -> bool:
        """Whether the request's grammar is compiled (and its matcher made). A constraint that failed to
        compile raises the compiler's error (the frontend checked it, so this is the engine's fault)."""
        so_request = request.structured_output_request
        if so_request is None or so_request.grammar is not None:
            return True
        if not so_request.compiled.done():
            return False
        # Made before the request is first admitted, so no token has been generated that it must replay.
        so_request.grammar = self._backend.matcher(so_request.compiled.result(), so_request.stop_token_ids)
        return True

    def wait_for_compilation(self, requests: Iterable[Request], timeout: float) -> None:
        """Block up to `timeout` seconds until one of these requests' grammars is compiled: what a step
        with nothing else to run does instead of spinning."""
        pending = [r.structured_output_request.compiled for r in requests
                   if r.structured_output_request is not None and r.structured_output_request.is_compiling]
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    # ----- each step ----------------------------------------------------------------
    def grammar_bitmask(self, requests: list[Request]) -> Optional[tuple[np.ndarray, dict[str, int]]]:
        """One int32 bitmask row per request whose next token the grammar constrains (bit t of a row:
        token t allowed), and each such request's row; None when no request of the step is constrained."""
        rows = [r for r in requests
                if r.structured_output_request is not None and r.structured_output_request.constrains_next_token]
        if not rows:
            return None
        from pagedllm.structured_output.backend_xgrammar import allocate_bitmask

        bitmask = allocate_bitmask(len(rows), self.vocab_size)
        for i, request in enumerate(rows):
            request.structured_output_request.grammar.fill_bitmask(bitmask, i)
        return bitmask.numpy(), {r.request_id: i for i, r in enumerate(rows)}

    def accept_token(self, request: Request, token_id: int) -> None:
        """Advance the request's grammar by the token it was just given."""
        if request.structured_output_request is not None and request.structured_output_request.grammar is not None:
            self._advance(request, token_id)

    def _advance(self, request: Request, token_id: int) -> None:
        so_request = request.structured_output_request
        if not so_request.reasoning_ended:
            so_request.reasoning_ended = token_id == so_request.reasoning_end_token_id
            return
        if so_request.grammar.is_terminated():
            return
        if not so_request.grammar.accept_token(token_id):
            logger.error("the grammar of request %s refused token %d, which its bitmask allowed",
                         request.request_id, token_id)

    # ----- the grammar engine -------------------------------------------------------
    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            from pagedllm.structured_output.backend_xgrammar import XgrammarBackend

            self._backend = XgrammarBackend(self._load_tokenizer(), self.vocab_size)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        return self._executor

    def _compile(self, key: tuple[str, str]) -> Any:
        start = time.perf_counter()
        try:
            return self._backend.compile(*key)
        finally:
            seconds = time.perf_counter() - start
            self.last_compile_seconds = seconds
            logger.debug("compiled a %s constraint in %.1f ms", key[0], 1e3 * seconds)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
