"""The model registry: which Hugging Face architectures pagedllm runs, and with what class."""

from __future__ import annotations

from pagedllm.model_executor.models.bert import BertForSequenceClassification, BertModel
from pagedllm.model_executor.models.decoder import DecoderForCausalLM
from pagedllm.model_executor.models.llava import LlavaForConditionalGeneration

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "MistralForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
    "Phi3ForCausalLM": DecoderForCausalLM,
    "Gemma2ForCausalLM": DecoderForCausalLM,
    "Gemma3ForCausalLM": DecoderForCausalLM,
    # mixture of experts (models/moe.py)
    "MixtralForCausalLM": DecoderForCausalLM,
    "Qwen2MoeForCausalLM": DecoderForCausalLM,
    "Qwen3MoeForCausalLM": DecoderForCausalLM,
    # vision-language models (images in prompts: pagedllm/multimodal/)
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    # encoder-only pooling models (runner="pooling")
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
}


def get_architecture(hf_config) -> str:
    """The first architecture the checkpoint declares that we support, or a clear error."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        model_type = getattr(hf_config, "model_type", "")
        archs = {"llama": ["LlamaForCausalLM"], "mistral": ["MistralForCausalLM"], "qwen2": ["Qwen2ForCausalLM"],
                 "qwen3": ["Qwen3ForCausalLM"], "phi3": ["Phi3ForCausalLM"], "gemma2": ["Gemma2ForCausalLM"],
                 "gemma3_text": ["Gemma3ForCausalLM"]}.get(model_type, [])
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ValueError(
        f"unsupported model architecture {archs or getattr(hf_config, 'model_type', '?')}; "
        f"pagedllm supports {sorted(SUPPORTED_ARCHITECTURES)}"
    )
