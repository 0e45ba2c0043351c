"""Writing tiny GGUF files in llama.cpp's layout: the metadata every test file shares.

The model-specific parts (which tensors, quantised or not, a family's extra keys) stay with each
test; the header of a decoder and the small byte-level BPE tokenizer with its chat template are here.
"""

from __future__ import annotations

from typing import Any

import gguf


def add_decoder_header(writer: gguf.GGUFWriter, config: Any, arch: str, rope_theta: float = 10000.0) -> int:
    """The architecture keys transformers reads back into the config; returns the head size."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    return head_dim


def add_tokenizer(writer: gguf.GGUFWriter, config: Any, tokens: list[str], special: list[str],
                  merges: dict[str, str], chat_template: str) -> None:
    """A byte-level BPE tokenizer (llama.cpp's "gpt2" model) with its special tokens and chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)
