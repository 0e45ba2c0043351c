"""Writing tiny GGUF files in llama.cpp's layout: the metadata every test file shares.

The model-specific parts (which tensors, quantised or not, a family's extra keys) stay with each
test; the header of a decoder, the small byte-level BPE tokenizer with its chat template and a Q6_K
writer (the gguf package only reads that type) are here.
"""

from __future__ import annotations

import dataclasses
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


# ----- full-size files of random blocks (benchmarks/gguf_load.py, the load-memory test) --------------------

@dataclasses.dataclass(frozen=True)
class Qwen2Shape:
    """A Qwen2 decoder's sizes; the defaults are Qwen2.5-0.5B's (untied here, as its Q4_K_M GGUF
    carries its own `output.weight`: that is what made its float32 load 2.5 GB)."""

    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151936
    tie: bool = False


QK_K = 256
T = gguf.GGMLQuantizationType
# llama.cpp's `convert_incompatible_tensor`: a K-quant needs rows of whole 256-weight super-blocks;
# a tensor whose row length is not one falls back to a type of 32-weight blocks.
K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_cpp_type(name: str, layer: int | None, shape: Qwen2Shape, mix: str, in_features: int) -> T:
    """The type llama.cpp's `llama_tensor_get_type` gives a matrix for `--type Q4_K_M` or `Q4_1`:
    the output matrix (the embedding when tied) Q6_K; with Q4_K_M, attn_v and ffn_down Q6_K in the
    layers `_use_more_bits` picks, Q4_K elsewhere; then the 256-weight fallback."""
    if mix not in ("Q4_K_M", "Q4_1"):
        raise ValueError(f"unknown mix {mix!r}: Q4_K_M or Q4_1")
    base = T.Q4_K if mix == "Q4_K_M" else T.Q4_1
    if name == "output.weight" or (shape.tie and name == "token_embd.weight"):
        qtype = T.Q6_K
    elif mix == "Q4_K_M" and layer is not None and name.split(".")[2] in ("attn_v", "ffn_down") \
            and _use_more_bits(layer, shape.layers):
        qtype = T.Q6_K
    else:
        qtype = base
    return K_FALLBACK.get(qtype, qtype) if in_features % QK_K else qtype


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid blocks: random quant bytes, float16 scales set so weights are about
    +-0.03 (a trained model's range), so a model of them computes finite numbers."""
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    nblocks = cols // block_weights
    raw = rng.integers(0, 256, size=(rows, nblocks, block_bytes), dtype=np.uint8)

    def f16(lo: float, hi: float, n: int = 1) -> np.ndarray:
        return rng.uniform(lo, hi, size=(rows, nblocks, n)).astype(np.float16).view(np.uint8)

    if qtype in (T.Q4_0, T.Q5_0, T.Q8_0):  # d first; w = d * (q - offset)
        raw[..., 0:2] = f16(*{T.Q4_0: (0.002, 0.004), T.Q5_0: (0.001, 0.002), T.Q8_0: (1e-4, 2e-4)}[qtype])
    elif qtype in (T.Q4_1, T.Q5_1):  # d, m; w = d * q + m
        raw[..., 0:2] = f16(0.001, 0.004)
        raw[..., 2:4] = f16(-0.03, -0.01)
    elif qtype in (T.Q4_K, T.Q5_K):  # d, dmin; w = d * sc * q - dmin * m, sc and m 6-bit
        raw[..., 0:2] = f16(2e-5, 5e-5)
        raw[..., 2:4] = f16(2e-4, 4e-4)
    elif qtype == T.Q6_K:  # ..., int8 scales, d last; w = d * sc * (q - 32)
        raw[..., 208:210] = f16(5e-6, 1e-5)
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return raw.reshape(rows, nblocks * block_bytes)


def bpe_vocabulary(size: int, special: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of exactly `size` tokens (the 256 bytes, merges of earlier tokens,
    the special tokens last) and its merges, as big as a real one so parsing it costs what it would."""
    from test_gguf_loader import _byte_level_alphabet  # the 256 byte stand-ins

    rng = np.random.default_rng(seed)
    tokens = _byte_level_alphabet()
    seen = set(tokens)
    merges = []
    target = size - len(special)
    while len(tokens) < target:
        pool = min(len(tokens), 4096)  # merging recent short tokens keeps strings a few characters long
        a, b = rng.integers(0, pool, size=2)
        merged = tokens[a] + tokens[b]
        if merged in seen:
            continue
        seen.add(merged)
        tokens.append(merged)
        merges.append(f"{tokens[a]} {tokens[b]}")
    return tokens + special, merges


def write_random_qwen2_gguf(path: str, shape: Qwen2Shape = Qwen2Shape(), mix: str = "Q4_K_M",
                            seed: int = 0) -> dict[str, int]:
    """A Qwen2 GGUF of `shape` with random blocks in llama.cpp's `mix`, a full-size BPE tokenizer and
    chat template. Returns bytes per GGML type. No floats are quantised: the blocks are random bytes."""
    from types import SimpleNamespace

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens, merges = bpe_vocabulary(shape.vocab, special, seed)
    config = SimpleNamespace(
        num_hidden_layers=shape.layers, max_position_embeddings=32768, hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        rms_norm_eps=1e-6, bos_token_id=tokens.index("<|endoftext|>"), eos_token_id=tokens.index("<|im_end|>"))
    writer = gguf.GGUFWriter(str(path), "qwen2")
    head_dim = add_decoder_header(writer, config, "qwen2", rope_theta=1000000.0)
    writer.add_vocab_size(shape.vocab)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M if mix == "Q4_K_M" else gguf.LlamaFileType.MOSTLY_Q4_1)
    add_tokenizer(writer, config, tokens, special, dict.fromkeys(merges),
                  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rng = np.random.default_rng(seed)
    kv = shape.kv_heads * head_dim
    sizes: dict[str, int] = {}

    def matrix(name: str, rows: int, cols: int, layer: int | None = None) -> None:
        qtype = llama_cpp_type(name, layer, shape, mix, cols)
        raw = random_blocks(qtype, rows, cols, rng)
        sizes[qtype.name] = sizes.get(qtype.name, 0) + raw.nbytes
        writer.add_tensor(name, raw, raw_dtype=qtype)

    def floats(name: str, data: np.ndarray) -> None:
        sizes["F32"] = sizes.get("F32", 0) + data.nbytes
        writer.add_tensor(name, data.astype(np.float32))

    matrix("token_embd.weight", shape.vocab, shape.hidden)
    for i in range(shape.layers):
        p = f"blk.{i}."
        floats(p + "attn_norm.weight", np.ones(shape.hidden))
        for part, rows in (("attn_q", shape.hidden), ("attn_k", kv), ("attn_v", kv)):
            matrix(p + part + ".weight", rows, shape.hidden, i)
            floats(p + part + ".bias", rng.uniform(-0.1, 0.1, rows))
        matrix(p + "attn_output.weight", shape.hidden, shape.hidden, i)
        floats(p + "ffn_norm.weight", np.ones(shape.hidden))
        matrix(p + "ffn_gate.weight", shape.intermediate, shape.hidden, i)
        matrix(p + "ffn_up.weight", shape.intermediate, shape.hidden, i)
        matrix(p + "ffn_down.weight", shape.hidden, shape.intermediate, i)
    floats("output_norm.weight", np.ones(shape.hidden))
    if not shape.tie:
        matrix("output.weight", shape.vocab, shape.hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sizes

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
