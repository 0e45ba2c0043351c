"""Writing tiny GGUF files in llama.cpp's layout: the metadata every test file shares.

The model-specific parts (which tensors, quantised or not, a family's extra keys) stay with each
test; the header of a decoder, the small byte-level BPE tokenizer with its chat template and a Q6_K
writer (the gguf package only reads that type) are here.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np


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


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, k] -> Q6_K blocks (uint8 [rows, k / 256 * 210]), as llama.cpp lays them out
    (the gguf package only reads Q6_K): per 16 weights an int8 scale sc, per 256 a float16 d,
    w ~ d * sc * (q - 32) with q in [0, 63]. Plain absmax rounding, not llama.cpp's search."""
    rows, k = w.shape
    sb = w.reshape(rows, k // 256, 16, 16).astype(np.float32)
    sub_scale = np.abs(sb).max(-1) / 31  # per 16
    d = (np.abs(sub_scale).max(-1, keepdims=True) / 127).astype(np.float16)  # per 256
    d32 = np.where(d == 0, 1, d.astype(np.float32))
    sc = np.clip(np.round(sub_scale / d32), -128, 127).astype(np.int8)
    step = d32[..., None] * sc.astype(np.float32)[..., None]
    q = np.clip(np.round(sb / np.where(step == 0, 1, step)), -32, 31).astype(np.int32) + 32
    q = q.reshape(rows, k // 256, 2, 4, 32)  # [half, i, l]: element 128 h + 32 i + l
    ql = np.zeros((rows, k // 256, 2, 64), dtype=np.uint8)
    ql[..., :32] = (q[..., 0, :] & 0xF) | ((q[..., 2, :] & 0xF) << 4)
    ql[..., 32:] = (q[..., 1, :] & 0xF) | ((q[..., 3, :] & 0xF) << 4)
    qh = ((q[..., 0, :] >> 4) | ((q[..., 1, :] >> 4) << 2) | ((q[..., 2, :] >> 4) << 4)
          | ((q[..., 3, :] >> 4) << 6)).astype(np.uint8)
    out = np.concatenate([ql.reshape(rows, k // 256, 128), qh.reshape(rows, k // 256, 64),
                          sc.reshape(rows, k // 256, 16).view(np.uint8), d.view(np.uint8)], axis=-1)
    return out.reshape(rows, -1)
