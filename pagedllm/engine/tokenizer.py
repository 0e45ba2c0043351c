"""Loading the tokenizer and the model's end-of-sequence ids through transformers."""

from __future__ import annotations

import os
from typing import Any, Optional

from pagedllm.logger import init_logger

logger = init_logger(__name__)


def load_tokenizer(path: str) -> Any:
    from pagedllm.model_executor.gguf_loader import is_gguf_file, load_gguf_tokenizer

    if is_gguf_file(path):
        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e


def load_generation_config(folder: Optional[str]) -> dict:
    """The generation_config.json in `folder` as a dict ({} when there is none, or no folder)."""
    if folder and os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "generation_config.json")):
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(folder).to_diff_dict()
    return {}


def eos_token_ids(tokenizer: Any, hf_config: Any, generation_config: dict) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS plus any the configs list."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None),
                   generation_config.get("eos_token_id")):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


# generation_config.json fields that become SamplingParams defaults (vLLM applies the same set).
_SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def sampling_defaults(generation_config: dict) -> dict:
    """The SamplingParams defaults a checkpoint's generation config sets (used where the user sets none)."""
    return {ours: generation_config[theirs] for theirs, ours in _SAMPLING_FIELDS.items() if theirs in generation_config}
