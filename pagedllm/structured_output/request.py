"""A request's structured-output state in the engine core: its constraint, the grammar being compiled
for it, and, once compiled, its place in that grammar."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Optional


class StructuredOutputRequest:
    """`kind`/`spec` name the constraint (the compile cache's key); `grammar` is the request's own matcher,
    made when the shared compiled grammar is ready. With a reasoning model, the constraint starts only
    after the token that ends the reasoning (`reasoning_end_token_id`) has been generated."""

    def __init__(self, kind: str, spec: str, stop_token_ids: list[int],
                 reasoning_end_token_id: Optional[int] = None) -> None:
        self.kind = kind
        self.spec = spec
        self.stop_token_ids = stop_token_ids
        self.compiled: Optional[Future] = None  # set by StructuredOutputManager.grammar_init
        self.grammar: Optional[Any] = None
        self.reasoning_end_token_id = reasoning_end_token_id
        self.reasoning_ended = reasoning_end_token_id is None

    @property
    def is_compiling(self) -> bool:
        return self.grammar is None and not self.compiled.done()

    @property
    def constrains_next_token(self) -> bool:
        """Whether the next sampled token must obey the grammar (compiled, reasoning over, not yet ended)."""
        return self.grammar is not None and self.reasoning_ended and not self.grammar.is_terminated()
