"""Which decoder layers are local (sliding-window) and which global, read once from a Hugging Face config.

Gemma 2 alternates local and global layers, Gemma 3 puts one global layer after every five local
ones, Mistral's layers are all local, Qwen2 may make its upper layers local; transformers writes
this as `layer_types` (or, for Mistral, only `sliding_window`). The model's attention layers and
the KV-cache manager both read it from here, so they cannot disagree about a layer.
"""

from __future__ import annotations

SLIDING = "sliding_attention"
FULL = "full_attention"


def layer_types(hf_config) -> list[str]:
    """Each layer's attention type, `SLIDING` or `FULL`."""
    num_layers = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None)
    types = getattr(hf_config, "layer_types", None)
    if not window:
        return [FULL] * num_layers
    if types is not None:
        if len(types) != num_layers:
            raise ValueError(f"layer_types names {len(types)} layers, the model has {num_layers}")
        return [SLIDING if t == SLIDING else FULL for t in types]
    if not getattr(hf_config, "use_sliding_window", True):
        return [FULL] * num_layers
    return [SLIDING] * num_layers  # Mistral: every layer is local


def layer_sliding_windows(hf_config) -> list[int | None]:
    """Each layer's window in tokens (a query sees itself and `window - 1` keys before it), None if global."""
    window = getattr(hf_config, "sliding_window", None)
    return [int(window) if t == SLIDING else None for t in layer_types(hf_config)]
