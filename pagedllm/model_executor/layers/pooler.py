"""The pooler: a pooling model's last step, from one step's hidden states to one vector per prompt.

It plays the part the sampler plays for a generator. The model runner hands it the final hidden
states of the whole step and says which rows belong to each finished pooling request
(`PoolingMetadata`); the pooler reduces each prompt's rows to one vector (its first token's for
CLS, its last's for LAST, their mean for MEAN; which one is the checkpoint's choice,
`model_executor/pooling_config.py`), then applies the task's head: for embeddings, Matryoshka
truncation (`dimensions`) and L2 normalisation; for classifiers, the model's classification head
and a softmax over the labels (a sigmoid for a single label, a cross-encoder's score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pagedllm.config import PoolerConfig
from pagedllm.pooling_params import PoolingParams


@dataclass
class PoolingMetadata:
    """Per pooled request, in order: its first row in the step's hidden states, its number of rows
    (the whole prompt, which a pooling request always runs in one step) and its parameters."""

    starts: list[int]
    lens: list[int]
    params: list[PoolingParams]


def pool(hidden: torch.Tensor, meta: PoolingMetadata, pooling_type: str) -> torch.Tensor:
    """[num_requests, hidden_size] in float32: each prompt's rows reduced by `pooling_type`."""
    starts = torch.tensor(meta.starts, dtype=torch.long)
    lens = torch.tensor(meta.lens, dtype=torch.long)
    if pooling_type == "CLS":
        return hidden[starts.to(hidden.device)].float()
    if pooling_type == "LAST":
        return hidden[(starts + lens - 1).to(hidden.device)].float()
    # MEAN: every row of each prompt, summed per prompt in float32, over its length.
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(meta.starts, meta.lens)]).to(hidden.device)
    segment = torch.repeat_interleave(torch.arange(len(meta.lens)), lens).to(hidden.device)
    sums = torch.zeros(len(meta.lens), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, segment, hidden[rows].float())
    return sums / lens.to(hidden.device, torch.float32)[:, None]


class Pooler:
    """`classify_head`: the model's classification head (a classifier's pooled states -> one logit per
    label), None for an embedding model."""

    def __init__(self, config: PoolerConfig, classify_head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> None:
        if config.task == "classify" and classify_head is None:
            raise ValueError("a classification pooler needs the model's classification head")
        self.config = config
        self.classify_head = classify_head

    def __call__(self, hidden: torch.Tensor, meta: PoolingMetadata) -> list[torch.Tensor]:
        """One float32 CPU tensor per request: what it gets back, head applied."""
        pooled = pool(hidden, meta, self.config.pooling_type)
        if self.config.task == "classify":
            return self._classify(pooled.to(hidden.dtype), meta)
        out = []
        for vector, params in zip(pooled, meta.params):
            if params.dimensions is not None:
                vector = vector[: params.dimensions]
            normalize = params.normalize if params.normalize is not None else (
                self.config.normalize and params.task != "encode")
            if normalize:
                vector = F.normalize(vector, p=2, dim=-1)
            out.append(vector)
        return [v.cpu() for v in out]

    def _classify(self, pooled: torch.Tensor, meta: PoolingMetadata) -> list[torch.Tensor]:
        logits = self.classify_head(pooled).float()
        out = []
        for row, params in zip(logits, meta.params):
            if params.task == "encode" or params.use_activation is False:
                out.append(row)
            elif row.numel() == 1:
                out.append(torch.sigmoid(row))
            else:
                out.append(torch.softmax(row, dim=-1))
        return [v.cpu() for v in out]
