"""What a pipeline stage holds of a decoder, and how its hidden states reach the next stage.

Under pipeline parallelism (`pipeline_parallel_size`) each stage builds only its contiguous run
of layers (`PipelineParallelGroup.layer_range`); the other layers are `MissingLayer`s, so layer i
keeps its name (`layers.i.…`) and a checkpoint's tensors map the same way on every stage. The first
stage also holds the token embedding, the last the final norm and the LM head (and the embedding
when the head is tied to it). A stage's output is the pair (hidden, residual) that the next
stage's first layer takes, sent with point-to-point ops.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.distributed.parallel_state import PipelineParallelGroup


class MissingLayer(nn.Module):
    """A layer another stage holds (vLLM's `PPMissingLayer`): no weights, never called."""

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003 - never reached
        raise RuntimeError("this layer belongs to another pipeline stage")


def is_stage_param(name: str, pp_group: PipelineParallelGroup, layer_range: tuple[int, int],
                   holds_embedding: bool) -> bool:
    """Whether the model tensor `name` ('layers.3.mlp.down_proj.weight', 'embed_tokens.weight',
    'norm.weight', 'lm_head.weight') is this stage's to load."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
        return layer_range[0] <= int(parts[1]) < layer_range[1]
    if parts[0] == "embed_tokens":
        return holds_embedding
    if parts[0] in ("norm", "lm_head"):
        return pp_group.is_last
    return True


def receive_hidden(pp_group: PipelineParallelGroup, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (hidden, residual) rows of this step from the stage before."""
    hidden, residual = pp_group.recv([(num_tokens, hidden_size)] * 2, dtype, device)
    return hidden, residual


def send_hidden(pp_group: PipelineParallelGroup, hidden: torch.Tensor, residual: torch.Tensor) -> None:
    """This stage's (hidden, residual) rows to the stage after."""
    pp_group.send([hidden, residual])
