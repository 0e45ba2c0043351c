"""Tiny random mixture-of-experts checkpoints, built with transformers' own config classes."""

from __future__ import annotations

import torch

from conftest import build_tokenizer

# Four experts, two per token: every expert is used by a handful of tokens, and tensor or expert
# parallelism over two ranks has two experts (or half of each expert) per rank.
MOE_FAMILIES = {
    # Mixtral: top-2 with the two weights renormalised to sum to 1.
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96),
    # Qwen3-MoE without renormalisation (norm_topk_prob=False), and a dense layer (mlp_only_layers).
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128,
                      norm_topk_prob=False, mlp_only_layers=[1], head_dim=32),
    # Qwen2-MoE: renormalised, Q/K/V biases, and a shared expert scaled by its sigmoid gate.
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128,
                      norm_topk_prob=True, shared_expert_intermediate_size=96),
}


def build_moe_checkpoint(path: str, family: str, seed: int = 0, **overrides) -> str:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    tokenizer = build_tokenizer(path)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.3, tie_word_embeddings=False,
    )
    common.update(MOE_FAMILIES[family])
    common.update(overrides)
    config_cls = {"mixtral": MixtralConfig, "qwen3_moe": Qwen3MoeConfig, "qwen2_moe": Qwen2MoeConfig}[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**common), dtype=torch.float32)
    if family == "qwen2_moe":  # make the Q/K/V biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


def write_tiny_moe_gguf(path: str, arch: str) -> dict[str, torch.Tensor]:
    """A random tiny Qwen3-MoE ("qwen3moe") or Qwen2-MoE ("qwen2moe") written as llama.cpp's converter
    writes one (stacked `ffn_{gate,up,down}_exps` expert tensors, Q8_0 blocks for some); returns its
    HF state_dict.

    transformers reads no expert size from a GGUF and takes the config class's defaults (Qwen3-MoE's
    768, Qwen2-MoE's 1408 and shared 5632: the released models'), so the experts here are that wide;
    llama.cpp's Qwen3-MoE routing renormalises the top-k, its Qwen2-MoE routing does not.
    """
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen3MoeConfig

    from gguf_utils import add_decoder_header, add_tokenizer
    from test_gguf_loader import CHAT_TEMPLATE, MERGED_TOKENS, SPECIAL_TOKENS, TOKENS

    common = dict(
        vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=TOKENS.index("<|im_start|>"), eos_token_id=TOKENS.index("<|im_end|>"),
        initializer_range=0.3,
    )
    if arch == "qwen3moe":
        config = Qwen3MoeConfig(moe_intermediate_size=768, head_dim=32, norm_topk_prob=True, **common)
    else:
        config = Qwen2MoeConfig(moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                norm_topk_prob=False, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    writer = gguf.GGUFWriter(path, arch)
    head_dim = add_decoder_header(writer, config, arch, rope_theta=config.rope_parameters["rope_theta"])
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    add_tokenizer(writer, config, TOKENS, SPECIAL_TOKENS, MERGED_TOKENS, CHAT_TEMPLATE)
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name_map = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors = {}
    for hf_name, tensor in state_dict.items():
        if hf_name.endswith("experts.gate_up_proj"):  # llama.cpp keeps gate and up apart
            gate, up = tensor.chunk(2, dim=1)
            for part, value in (("gate_proj", gate), ("up_proj", up)):
                tensors[name_map.get_name(hf_name.replace("gate_up_proj", part)) + ".weight"] = value
        elif hf_name.endswith("experts.down_proj"):
            tensors[name_map.get_name(hf_name) + ".weight"] = tensor
        elif hf_name.endswith("shared_expert_gate.weight"):  # llama.cpp stores this [1, hidden] as [hidden]
            tensors[name_map.get_name(hf_name, try_suffixes=(".weight",))] = tensor[0]
        else:
            tensors[name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = tensor
    for gguf_name, tensor in tensors.items():
        data = np.ascontiguousarray(tensor.numpy())
        if gguf_name in ("token_embd.weight", "blk.0.ffn_down_exps.weight", "blk.1.attn_q.weight"):
            writer.add_tensor(gguf_name, gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state_dict
