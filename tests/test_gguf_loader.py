"""GGUF loading: tiny GGUFs converted here from random Hugging Face models, plus the real SmolLM2 file.

The tiny files are written the way llama.cpp's converter writes them (its tensor names, its Q/K row
permutation for llama, Q8_0 blocks for some tensors), so reading them back must give the original
Hugging Face state_dict, and the same tensors transformers' own GGUF loading gives.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
from gguf_utils import add_decoder_header, add_tokenizer, quantize_q6_k
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.ggml import _gguf_parse_value
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from pagedllm.model_executor.gguf_loader import (
    SUPPORTED_GGUF_ARCHITECTURES,
    is_gguf_file,
    iterate_gguf_weights,
    load_gguf_config,
    load_gguf_tokenizer,
)
from pagedllm.model_executor.gguf_reader import FastGGUFReader, reads_fast

torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGED_TOKENS = {"h e": "he", "l l": "ll", "he ll": "hell", "Ġ w": "Ġw"}
# tensors stored as Q8_0 blocks rather than F32, as a quantised file would have them
QUANTISED = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_down.weight"}


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what byte-level BPE vocabularies are made of)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


TOKENS = _byte_level_alphabet() + list(MERGED_TOKENS.values()) + SPECIAL_TOKENS


def _tiny_hf_model(arch: str, tie: bool, hidden_size: int = 64, intermediate_size: int = 128) -> torch.nn.Module:
    common = dict(
        vocab_size=len(TOKENS),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=TOKENS.index("<|im_start|>"),
        eos_token_id=TOKENS.index("<|im_end|>"),
    )
    if arch == "llama":
        config = AutoConfig.for_model("llama", num_attention_heads=4, num_key_value_heads=2, **common)
    elif arch == "qwen2":
        config = AutoConfig.for_model("qwen2", num_attention_heads=4, num_key_value_heads=2, **common)
    else:  # transformers reads no head_dim from a qwen3 GGUF and assumes Qwen3's 128
        config = AutoConfig.for_model("qwen3", num_attention_heads=2, num_key_value_heads=1, head_dim=128, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():  # random norms and biases too, so a swapped tensor shows
            param.normal_()
    return model


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: Q/K rows reordered for its RoPE layout."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def write_tiny_gguf(path: Path, arch: str = "llama", tie: bool = True,
                    quant_type: gguf.GGMLQuantizationType | None = None, hidden_size: int = 64,
                    intermediate_size: int = 128, overrides: dict[str, gguf.GGMLQuantizationType] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Convert a random tiny model to a GGUF at `path`.

    Returns the model's Hugging Face state_dict and the names of the tensors stored quantised:
    the four in QUANTISED as Q8_0, or with `quant_type` every matrix (as a quantised file has them).
    `overrides` ({"ffn_down": Q6_K}, say) gives the matrices whose GGUF name holds a key that type
    instead, as a Q4_K_M file mixes types (Q6_K needs sizes that are multiples of 256).
    """
    model = _tiny_hf_model(arch, tie, hidden_size, intermediate_size)
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = add_decoder_header(writer, config, arch)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    add_tokenizer(writer, config, TOKENS, SPECIAL_TOKENS, MERGED_TOKENS, CHAT_TEMPLATE)

    name_map = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), config.num_hidden_layers
    )
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    quantised = set()
    if tie:
        del state_dict["lm_head.weight"]
    for hf_name, tensor in state_dict.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.numpy()
        if arch == "llama" and ".attn_q." in gguf_name:
            data = _llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            data = _llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
        qtype = (quant_type if data.ndim == 2 else None) if quant_type is not None else (
            gguf.GGMLQuantizationType.Q8_0 if gguf_name in QUANTISED else None)
        if qtype is not None and data.ndim == 2:
            qtype = next((t for key, t in (overrides or {}).items() if key in gguf_name), qtype)
        if qtype is not None:
            quantised.add(hf_name)
            blocks = quantize_q6_k(data) if qtype == gguf.GGMLQuantizationType.Q6_K else gguf.quantize(data, qtype)
            writer.add_tensor(gguf_name, blocks, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state_dict, quantised


def _transformers_gguf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """What transformers' `from_pretrained(..., gguf_file=...)` loads for these architectures.

    It calls `load_gguf_checkpoint` with the model it built; called directly here because
    `from_pretrained` also insists on `accelerate`, which pagedllm does not need.
    """
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]


@pytest.fixture(scope="module", params=[("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False)],
                ids=["llama-tied", "llama-untied", "qwen2-tied", "qwen3-untied"])  # fmt: skip
def tiny_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    arch, tie = request.param
    path = tmp_path_factory.mktemp(f"gguf-{arch}") / f"tiny-{arch}.gguf"
    state_dict, quantised = write_tiny_gguf(path, arch, tie)
    return path, arch, tie, state_dict, quantised


def test_weights_round_trip_to_the_hf_state_dict(tiny_gguf) -> None:
    path, arch, tie, original, quantised = tiny_gguf
    loaded = dict(iterate_gguf_weights(path, torch.float32))
    assert sorted(loaded) == sorted(original)
    assert len(quantised) == 4
    assert ("lm_head.weight" in loaded) == (not tie)
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32 and tensor.shape == original[name].shape, name
        if name in quantised:  # Q8_0: within half a quantisation step of the original
            step = original[name].abs().max().item() / 127
            torch.testing.assert_close(tensor, original[name], atol=step, rtol=0, msg=name)
        else:
            assert torch.equal(tensor, original[name]), name


def test_weights_match_transformers_gguf_loading(tiny_gguf) -> None:
    path = tiny_gguf[0]
    expected = _transformers_gguf_tensors(path)
    loaded = dict(iterate_gguf_weights(path, torch.float32))
    assert sorted(loaded) == sorted(expected)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, expected[name]), name


def test_weights_in_bfloat16(tiny_gguf) -> None:
    path = tiny_gguf[0]
    reference = dict(iterate_gguf_weights(path, torch.float32))
    for name, tensor in iterate_gguf_weights(path, torch.bfloat16):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_weights_are_copies_not_views_of_the_file(tiny_llama_bytes: bytes, tmp_path: Path) -> None:
    """F32 tensors come out of `gguf` as views of the read-only file mapping; writing one would crash."""
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_llama_bytes)
    loaded = dict(iterate_gguf_weights(path, torch.float32))
    snapshot = {name: tensor.clone() for name, tensor in loaded.items()}
    with open(path, "r+b") as f:  # overwrite the tensor data in place: mapped views would change too
        f.seek(len(tiny_llama_bytes) // 2)
        f.write(bytes(len(tiny_llama_bytes) - len(tiny_llama_bytes) // 2))
    for name, tensor in loaded.items():
        assert torch.equal(tensor, snapshot[name]), name


def test_config_from_gguf(tiny_gguf) -> None:
    path, arch, tie = tiny_gguf[:3]
    config = load_gguf_config(path)
    assert config.model_type == arch
    assert config.tie_word_embeddings == tie
    assert config.vocab_size == len(TOKENS)
    assert config.hidden_size == 64 and config.num_hidden_layers == 2
    assert config.bos_token_id == TOKENS.index("<|im_start|>")
    assert config.eos_token_id == TOKENS.index("<|im_end|>")
    config.hidden_size = 1  # callers get their own copy of the cached config
    assert load_gguf_config(path).hidden_size == 64


def _same_fields_as_gguf_reader(path: Path) -> None:
    fast, slow = FastGGUFReader(str(path)), gguf.GGUFReader(str(path))
    assert list(fast.fields) == list(slow.fields)
    for name, a in fast.fields.items():
        b = slow.fields[name]
        assert (a.offset, a.data, a.types, len(a.parts)) == (b.offset, b.data, b.types, len(b.parts)), name
        assert a.contents() == b.contents(), name
        # what transformers makes of each element
        assert [_gguf_parse_value(a.parts[i], a.types) for i in a.data] == \
            [_gguf_parse_value(b.parts[i], b.types) for i in b.data], name
    assert [(t.name, t.tensor_type, t.data_offset, t.data.shape) for t in fast.tensors] == \
        [(t.name, t.tensor_type, t.data_offset, t.data.shape) for t in slow.tensors]


def test_fast_reader_reads_what_gguf_reads(tiny_gguf) -> None:
    """`FastGGUFReader` parses metadata arrays in bulk; the fields must be gguf's, part for part,
    and the config transformers builds through it (without the merges) transformers' own."""
    path = tiny_gguf[0]
    _same_fields_as_gguf_reader(path)
    with reads_fast():
        fast = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert fast.to_dict() == AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()


def test_tokenizer_from_gguf_matches_auto_tokenizer(tiny_gguf) -> None:
    path = tiny_gguf[0]
    tokenizer = load_gguf_tokenizer(path)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    messages = [{"role": "user", "content": "hello world"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    for text in ["hello world", prompt, "héllo\n\t wörld!"]:
        assert tokenizer(text).input_ids == reference(text).input_ids
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer("hello").input_ids[:2] == [TOKENS.index("hell"), TOKENS.index("o")]
    assert tokenizer("<|im_end|>").input_ids == [TOKENS.index("<|im_end|>")]


# --- clear errors -----------------------------------------------------------------------------------

ALL_ENTRY_POINTS = [
    load_gguf_config,
    load_gguf_tokenizer,
    lambda path: iterate_gguf_weights(path, torch.float32),
]


@pytest.mark.parametrize("load", ALL_ENTRY_POINTS, ids=["config", "tokenizer", "weights"])
def test_missing_file(load, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"GGUF file .*missing\.gguf does not exist"):
        load(tmp_path / "missing.gguf")


@pytest.mark.parametrize("load", ALL_ENTRY_POINTS, ids=["config", "tokenizer", "weights"])
def test_not_a_gguf_file(load, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model\n" * 100)
    assert not is_gguf_file(garbage)
    with pytest.raises(ValueError, match=r"garbage\.gguf is not a GGUF file"):
        load(garbage)
    with pytest.raises(ValueError, match="is not a file"):
        load(tmp_path)


@pytest.mark.parametrize("load", ALL_ENTRY_POINTS, ids=["config", "tokenizer", "weights"])
def test_truncated_header(load, tiny_llama_bytes: bytes, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_llama_bytes[:300])  # cut inside the metadata
    assert is_gguf_file(truncated)
    with pytest.raises(ValueError, match=r"truncated\.gguf is not a valid GGUF file \(truncated or corrupt"):
        load(truncated)


def test_truncated_tensor_data(tiny_llama_bytes: bytes, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_llama_bytes[: len(tiny_llama_bytes) - 1000])  # metadata intact, data cut
    with pytest.raises(ValueError, match=r"truncated\.gguf is not a valid GGUF file \(truncated or corrupt"):
        iterate_gguf_weights(truncated, torch.float32)


def test_corrupt_metadata(tiny_llama_bytes: bytes, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    data = bytearray(tiny_llama_bytes)
    data[4:8] = (99).to_bytes(4, "little")  # an unknown GGUF version
    corrupt.write_bytes(bytes(data))
    for load in ALL_ENTRY_POINTS:
        with pytest.raises(ValueError, match=r"corrupt\.gguf is not a valid GGUF file"):
            load(corrupt)


@pytest.mark.parametrize("load", ALL_ENTRY_POINTS, ids=["config", "tokenizer", "weights"])
@pytest.mark.parametrize("arch", ["bert", "made-up-arch"])
def test_unsupported_architecture(load, arch: str, tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    supported = ", ".join(SUPPORTED_GGUF_ARCHITECTURES)
    expected = rf"other\.gguf: GGUF architecture '{arch}' is not supported \(supported: {supported}\)"
    with pytest.raises(ValueError, match=expected):
        load(path)


def test_dtype_must_be_floating_point(tiny_llama_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_llama_bytes)
    with pytest.raises(ValueError, match="floating-point dtype"):
        iterate_gguf_weights(path, torch.int8)


@pytest.fixture(scope="module")
def tiny_llama_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("gguf-bytes") / "tiny.gguf"
    write_tiny_gguf(path, "llama", tie=True)
    return path.read_bytes()


# --- the real default model ---------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_weights_match_transformers(smollm2_gguf: Path) -> None:
    config = load_gguf_config(smollm2_gguf)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    hf_shapes = {name: tuple(t.shape) for name, t in hf_model.state_dict().items()}
    assert config.tie_word_embeddings
    del hf_shapes["lm_head.weight"]  # tied to the embeddings, so not in the file

    loaded = dict(iterate_gguf_weights(smollm2_gguf, torch.float32))
    assert {name: tuple(t.shape) for name, t in loaded.items()} == hf_shapes
    expected = _transformers_gguf_tensors(smollm2_gguf)
    assert sorted(expected) == sorted(loaded)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.real_model
def test_smollm2_config_and_tokenizer(smollm2_gguf: Path) -> None:
    config = load_gguf_config(smollm2_gguf)
    assert type(config).__name__ == "LlamaConfig"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49152, 576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    tokenizer = load_gguf_tokenizer(smollm2_gguf)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert os.path.getsize(smollm2_gguf) == 98362432
    _same_fields_as_gguf_reader(smollm2_gguf)  # a real 49k vocabulary, merges, token types


def test_a_mixture_of_experts_gguf_is_refused_clearly(tmp_path: Path) -> None:
    """llama.cpp writes Mixtral as "llama" with experts, which transformers would read as a dense Llama."""
    path = tmp_path / "mixtral.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_expert_count(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"mixtral\.gguf: mixture-of-experts GGUF files \(llama with 8 experts"):
        iterate_gguf_weights(path, torch.float32)
