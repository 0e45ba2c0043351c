"""`PoolingParams`: what a pooling request (embed, classify, score, encode) asks of the pooler.

vLLM's counterpart of `SamplingParams` for pooling models. A pooling request runs its prompt once
and gets one vector back instead of sampled tokens, so it has no decoding knobs; what it can ask
for is the shape of that vector: Matryoshka truncation (`dimensions`) and whether the pooler's
activation runs (`normalize` for embeddings, `use_activation` for classification scores).
Validated once here; the model-dependent checks (dimensions against the hidden size, the task
against the model) are the input processor's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

# vLLM's pooling tasks. `encode` is the raw pooled hidden state (no normalisation unless asked);
# `score` is a cross-encoder's relevance of a (query, document) pair, a `classify` on one label.
POOLING_TASKS = ("embed", "classify", "score", "encode")


@dataclass
class PoolingParams:
    """`dimensions`: keep the first N values of an embedding (then normalise), for Matryoshka models.
    `normalize`: L2-normalise an embedding (None: the model's default, True for every embedding
    model pagedllm serves). `use_activation`: softmax (several labels) or sigmoid (one label) on a
    classifier's logits (None: yes). `task` is set by the entry point (`LLM.embed`, `/v1/embeddings`).
    """

    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    use_activation: Optional[bool] = None
    task: Optional[str] = None
    # Set by the entry point, not the user: for a (query, document) pair given to a BERT cross-encoder,
    # where the second segment starts (token type 1 from there on). vLLM calls this "compressed token
    # type ids" and carries it the same way, so the engine core's requests stay plain token lists.
    extra_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dimensions is not None and (
                not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool) or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
        for name in ("normalize", "use_activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be a boolean or None, got {value!r}")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"task must be one of {list(POOLING_TASKS)}, got {self.task!r}")

    def clone(self) -> "PoolingParams":
        return copy.deepcopy(self)

    @property
    def token_type_boundary(self) -> Optional[int]:
        """Index of the first token of the second segment (None: one segment, all token type 0)."""
        return self.extra_kwargs.get("compressed_token_type_ids")
