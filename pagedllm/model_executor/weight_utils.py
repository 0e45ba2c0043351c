"""Reading checkpoint tensors: Hugging Face safetensors files, single or sharded."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.model_executor.layers.linear import copy_weight


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's shard files: those named by the index if there is one, else all."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights found in {model_dir}")
    return files


def iterate_safetensors_weights(model_dir: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Floating-point tensors in `dtype`; integer ones (a quantized checkpoint's packed weights, zero
    points and group indices) as they are stored."""
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_param(model: nn.Module, params: dict[str, nn.Parameter], name: str, target: str, tensor: torch.Tensor,
               shard, loaded: set[str], what: str = "checkpoint") -> None:
    """Copy checkpoint tensor `name` into `params[target]` through its module's `weight_loader` (this
    tensor-parallel rank's slice, one part of a fused matrix) or as it is, and note it in `loaded`
    ('target:shard' for a part). A ValueError names the checkpoint tensor."""
    weight_loader = getattr(model.get_submodule(target.rpartition(".")[0]), "weight_loader", None)
    with torch.no_grad():
        try:
            if weight_loader is None:
                copy_weight(params[target], tensor)
            else:
                weight_loader(params[target], tensor, shard)
        except ValueError as e:
            raise ValueError(f"{what} tensor {name!r} {e}") from e
    loaded.add(target if shard is None else f"{target}:{shard}")


def raise_if_missing(params: Iterable[str], loaded: set[str], what: str = "checkpoint") -> None:
    """Every parameter must have been loaded, whole or (a fused one) in parts."""
    missing = [n for n in params if not any(seen == n or seen.startswith(n + ":") for seen in loaded)]
    if missing:
        raise ValueError(f"{what} is missing weights, e.g. {missing[:3]}")
