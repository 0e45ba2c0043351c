"""Pre-quantized checkpoints: which scheme a checkpoint was saved in, read from its config, as vLLM does.

A GPTQ, AWQ or compressed-tensors checkpoint says so in config.json's `quantization_config`
(`quant_method`: "gptq", "awq", "compressed-tensors"), or, from older tools, in a
`quantize_config.json` (AutoGPTQ) or `quant_config.json` (AutoAWQ) beside it. `quantization=None`
takes the checkpoint's scheme; naming another one is an error, as is naming one for a checkpoint
that holds plain weights.
"""

from __future__ import annotations

import json
import os
from typing import Any, Union

from pagedllm.model_executor.layers.quantization.awq import AWQConfig
from pagedllm.model_executor.layers.quantization.compressed_tensors import CompressedTensorsConfig
from pagedllm.model_executor.layers.quantization.gptq import GPTQConfig

CheckpointQuantConfig = Union[GPTQConfig, AWQConfig, CompressedTensorsConfig]
CHECKPOINT_QUANTIZATION = {"gptq": GPTQConfig, "awq": AWQConfig, "compressed-tensors": CompressedTensorsConfig}
# the files older tools wrote their settings to, and the scheme each implies when it does not say
_CONFIG_FILES = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"))


def read_checkpoint_quantization(hf_config: Any, model_path: str) -> dict[str, Any] | None:
    """The checkpoint's quantization settings with `quant_method` filled in, or None for plain weights."""
    config = getattr(hf_config, "quantization_config", None)
    if config is not None:
        config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        config["quant_method"] = str(config.get("quant_method", "")).lower()
        return config
    for name, implied in _CONFIG_FILES:
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            config["quant_method"] = str(config.get("quant_method") or implied).lower()
            return config
    return None


def resolve_checkpoint_quantization(quantization: str | None, hf_config: Any,
                                    model_path: str) -> tuple[str | None, CheckpointQuantConfig | None]:
    """(the `quantization` to run, its parsed settings where the checkpoint is pre-quantized)."""
    settings = read_checkpoint_quantization(hf_config, model_path) if os.path.isdir(model_path) else None
    if settings is None:
        if quantization in CHECKPOINT_QUANTIZATION:
            raise ValueError(f"quantization={quantization!r} loads a checkpoint saved in that format, and "
                             f"{model_path} has no quantization_config (plain weights)")
        return quantization, None
    method = settings["quant_method"]
    if method not in CHECKPOINT_QUANTIZATION:
        raise ValueError(f"{model_path} is quantized with quant_method={method!r}, which is not supported; "
                         f"supported: {sorted(CHECKPOINT_QUANTIZATION)}")
    if quantization is not None and quantization != method:
        raise ValueError(f"{model_path} is a {method} checkpoint; quantization={quantization!r} cannot apply to it "
                         f"(leave quantization unset, or pass {method!r})")
    if getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None):
        raise ValueError(f"{method} checkpoints of mixture-of-experts models are not supported (the experts' "
                         "fused-MoE layers have no quantized method yet)")
    return method, CHECKPOINT_QUANTIZATION[method].from_config(settings)
