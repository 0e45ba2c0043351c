"""Whether a checkpoint generates or pools, and how it pools: vLLM's `runner` / `convert` resolution.

A checkpoint says what it is by its architecture: `BertModel` is an embedding model, a
`...ForSequenceClassification` a classifier (a cross-encoder reranker when it has one label), a
`...ForCausalLM` a generator that `convert="embed"` turns into an embedding model (last-token
pooling on its final hidden states, as Qwen3-Embedding is used). How the hidden states are pooled
comes from the sentence-transformers files when the checkpoint has them (`modules.json` naming a
`Pooling` module whose `config.json` says CLS, mean or last token), else from the architecture's
default, as vLLM reads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from pagedllm.config import PoolerConfig
from pagedllm.logger import init_logger

logger = init_logger(__name__)

RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify")
# vLLM's deprecated `task`, as a (runner, convert) pair.
TASKS = {"auto": ("auto", "auto"), "generate": ("generate", "auto"), "embed": ("pooling", "embed"),
         "embedding": ("pooling", "embed"), "classify": ("pooling", "classify"), "score": ("pooling", "classify")}

# Architectures that are pooling models as they stand: (task, default pooling).
POOLING_ARCHITECTURES = {
    "BertModel": ("embed", "CLS"),
    "BertForSequenceClassification": ("classify", "CLS"),
}
# sentence-transformers' pooling_mode_* flags -> vLLM's pooling type.
_ST_POOLING_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN",
                     "pooling_mode_lasttoken": "LAST"}


@dataclass(frozen=True)
class RunnerChoice:
    runner_type: str
    pooler_config: Optional[PoolerConfig] = None
    # sentence-transformers' max_seq_length: the longest input the model was trained for
    max_seq_length: Optional[int] = None
    # an encoder (BERT): attention is bidirectional and nothing is kept in a KV cache between steps
    encoder_only: bool = False


def resolve_runner(hf_config: Any, model_path: str, runner: str = "auto", convert: str = "auto",
                   task: str = "auto") -> RunnerChoice:
    """The runner and pooler a model runs with, or a `ValueError` for a combination that cannot work."""
    for name, value, allowed in (("runner", runner, RUNNERS), ("convert", convert, CONVERTS), ("task", task, TASKS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    if task != "auto":
        task_runner, task_convert = TASKS[task]
        runner = task_runner if runner == "auto" else runner
        convert = task_convert if convert == "auto" else convert
    archs = list(getattr(hf_config, "architectures", None) or [])
    native = next((POOLING_ARCHITECTURES[a] for a in archs if a in POOLING_ARCHITECTURES), None)
    if runner == "auto":
        runner = "pooling" if native is not None or convert in ("embed", "classify") else "generate"
    if runner == "generate":
        if native is not None:
            raise ValueError(f"{archs[0]} is a pooling model ({native[0]}); it cannot generate text. "
                             "Run it with runner='pooling' (the default for it) and use embed/classify/score")
        if convert in ("embed", "classify"):
            raise ValueError(f"convert={convert!r} makes a pooling model; it needs runner='pooling', not 'generate'")
        return RunnerChoice("generate")
    if native is not None:
        pooler_task, default_pooling = native
        if convert not in ("auto", "none", pooler_task):
            raise ValueError(f"{archs[0]} is a {pooler_task} model; convert={convert!r} does not apply to it")
    else:
        if convert == "none":
            raise ValueError(f"{archs or hf_config.model_type} generates text; runner='pooling' needs convert='embed'")
        if convert == "classify":
            raise NotImplementedError("convert='classify' on a decoder checkpoint (a sequence-classification head on "
                                      "a generator) is not supported by pagedllm yet; convert='embed' is")
        pooler_task, default_pooling = "embed", "LAST"
    st_pooling, max_seq_length = read_sentence_transformers_config(model_path)
    pooling_type = st_pooling or default_pooling
    logger.info("Pooling model: %s with %s pooling%s", pooler_task, pooling_type,
                " (from the sentence-transformers config)" if st_pooling else "")
    return RunnerChoice("pooling", PoolerConfig(pooling_type=pooling_type, task=pooler_task), max_seq_length,
                        encoder_only=native is not None)


def read_sentence_transformers_config(model_path: str) -> tuple[Optional[str], Optional[int]]:
    """(pooling type, max_seq_length) from a sentence-transformers checkpoint; (None, None) otherwise."""
    if not os.path.isdir(model_path):
        return None, None
    pooling_type = None
    modules_file = os.path.join(model_path, "modules.json")
    if os.path.isfile(modules_file):
        with open(modules_file) as f:
            modules = json.load(f)
        for module in modules:
            if module.get("type", "").endswith("models.Pooling"):
                pooling_file = os.path.join(model_path, module.get("path", ""), "config.json")
                if os.path.isfile(pooling_file):
                    with open(pooling_file) as f:
                        pooling = json.load(f)
                    modes = [kind for flag, kind in _ST_POOLING_MODES.items() if pooling.get(flag)]
                    if len(modes) != 1 or any(pooling.get(k) for k in ("pooling_mode_max_tokens",
                                                                       "pooling_mode_mean_sqrt_len_tokens")):
                        raise ValueError(f"{pooling_file}: only one of CLS, mean or last-token pooling is supported, "
                                         f"got {pooling}")
                    pooling_type = modes[0]
    max_seq_length = None
    st_file = os.path.join(model_path, "sentence_bert_config.json")
    if os.path.isfile(st_file):
        with open(st_file) as f:
            max_seq_length = json.load(f).get("max_seq_length")
    return pooling_type, max_seq_length
