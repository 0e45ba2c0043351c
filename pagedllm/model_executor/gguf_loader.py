"""Reading a GGUF checkpoint (llama.cpp's single-file format) as a Hugging Face config, tokenizer and weights.

transformers already turns GGUF metadata into a config and a tokenizer, and knows which tensor
transforms llama.cpp applied on the way in; this module leans on it and adds what an inference engine
needs on top: weights streamed one tensor at a time under their Hugging Face names (so the safetensors
loading path takes them unchanged), and one-line `ValueError`s instead of tracebacks from deep inside
`gguf` or transformers.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Iterator, NoReturn

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)


def _gguf():
    """The gguf package, imported on first use: machines that only load safetensors (the bare
    GPU machines, say) need not have it."""
    import gguf

    return gguf

GGUF_MAGIC = b"GGUF"

# GGUF `general.architecture` -> the transformers model types it can become. llama.cpp files Mistral
# models under "llama"; transformers tells them apart by name and builds a MistralConfig.
SUPPORTED_GGUF_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("llama", "mistral"),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "qwen2moe": ("qwen2_moe",),
    "qwen3moe": ("qwen3_moe",),
    "phi3": ("phi3",),
    "gemma2": ("gemma2",),
    "gemma3": ("gemma3_text",),  # the text model; transformers reads a gemma3 GGUF as Gemma3TextConfig
}
# Of those, the mixture-of-experts ones (whose experts transformers reads; it reads a "llama" file's as nothing).
MOE_GGUF_ARCHITECTURES = ("qwen2moe", "qwen3moe")


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a regular file that starts with the GGUF magic bytes (whatever its extension)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def load_gguf_config(path: str | os.PathLike[str]) -> PretrainedConfig:
    """The Hugging Face config transformers builds from the file's metadata (e.g. a LlamaConfig).

    Parsing the metadata takes seconds for a large vocabulary, so the result is cached per file
    version; each call gets its own copy because callers may edit their config.
    """
    path = _check_gguf_file(path)
    stat = os.stat(path)
    return copy.deepcopy(_cached_config(path, stat.st_size, stat.st_mtime_ns))


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """A fast tokenizer built from the file's vocabulary, with its special tokens and chat template.

    `PreTrainedTokenizerFast` is used rather than `AutoTokenizer` because the latter re-parses the
    whole metadata just to choose a class, and for a GGUF every class ends up with the same backend.
    """
    path = _check_gguf_file(path)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
        )
    except Exception as exc:
        _raise_clear_error(path, "read the tokenizer from", exc)
    if not tokenizer.chat_template:
        logger.warning("%s has no chat template in its metadata; chat requests will need one", path)
    return tokenizer


# GGML types that are plain floats: always handed over as tensors, never kept as blocks.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


@dataclasses.dataclass
class GGUFQuantizedTensor:
    """A GGUF tensor left in its blocks (`quantization="gguf"`): `raw` is uint8 [rows, row bytes]
    (a view of the mapped file) of the Hugging Face [out, in] matrix `shape`, rows already in
    Hugging Face order. The GGUF linear method decodes it; anything else asks for `dequantize`."""

    type_name: str
    raw: np.ndarray
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        weights = _gguf().dequantize(self.raw, _gguf().GGMLQuantizationType[self.type_name])
        return _to_torch(weights.reshape(self.shape), dtype)


def iterate_gguf_weights(path: str | os.PathLike[str], dtype: torch.dtype,
                         keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | GGUFQuantizedTensor]]:
    """Yield `(Hugging Face parameter name, tensor)` for every weight in the file, dequantised to `dtype`.

    `keep_quantized`: quantised 2-D tensors come as `GGUFQuantizedTensor`s instead, undecoded
    (`quantization="gguf"`: the layers keep them in blocks).

    Names and layouts are those of the matching transformers model's `state_dict()`. Only one tensor is
    materialised at a time (the file is memory-mapped), so peak memory is one dequantised tensor, not
    the model. `lm_head.weight` appears only when the file stores a separate output matrix; otherwise
    the model ties it to the embeddings. The file is checked when this is called, not when iteration
    starts, so a bad file fails before any work is done.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"GGUF weights can only be loaded as a floating-point dtype, not {dtype!r}")
    path = _check_gguf_file(path)
    reader = _open_reader(path)
    architecture = _architecture(reader, path)
    config = load_gguf_config(path)
    targets = _gguf_to_hf_names(architecture, config)
    # transformers' per-architecture fix-ups, e.g. undoing llama.cpp's interleaving of Q/K rows for RoPE
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    return _generate_weights(path, reader, targets, processor, dtype, keep_quantized)


def _generate_weights(
    path: str,
    reader: gguf.GGUFReader,
    targets: dict[str, tuple[str, tuple[int, ...]]],
    processor: TensorProcessor,
    dtype: torch.dtype,
    keep_quantized: bool = False,
) -> Iterator[tuple[str, torch.Tensor | GGUFQuantizedTensor]]:
    start = time.perf_counter()
    count = 0
    for tensor in reader.tensors:
        target = targets.get(tensor.name)
        if target is None:
            # e.g. llama.cpp's precomputed `rope_freqs`, which transformers derives from the config
            logger.debug("%s: skipping GGUF tensor %s, which has no Hugging Face counterpart", path, tensor.name)
            continue
        hf_name, hf_shape = target
        if keep_quantized and tensor.tensor_type.name not in FLOAT_TYPES and len(hf_shape) == 2:
            count += 1
            yield hf_name, _quantized_tensor(path, tensor, hf_shape, processor)
            continue
        try:
            weights = _gguf().dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ValueError(
                f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, "
                f"which the gguf package cannot dequantise ({exc})"
            ) from None
        weights = processor.process(weights=weights, name=tensor.name).weights
        if tuple(weights.shape) != hf_shape:
            raise ValueError(
                f"{path}: tensor {tensor.name} has shape {tuple(weights.shape)} but the config's "
                f"{hf_name} needs {hf_shape}; the file's metadata and tensors disagree"
            )
        count += 1
        yield hf_name, _to_torch(weights, dtype)
    logger.debug("Read %d tensors from %s in %.2f s", count, path, time.perf_counter() - start)


def _quantized_tensor(path: str, tensor: gguf.ReaderTensor, hf_shape: tuple[int, ...],
                      processor: TensorProcessor) -> GGUFQuantizedTensor:
    """The tensor's rows of blocks, reordered as transformers' fix-ups reorder the dequantised rows
    (they only ever permute rows, e.g. llama's Q/K, so the permutation is read off row indices)."""
    raw = tensor.data
    rows = raw.shape[0] if raw.ndim == 2 else 0
    if raw.ndim != 2 or rows != hf_shape[0]:
        raise ValueError(f"{path}: tensor {tensor.name} has {tuple(raw.shape)} rows of blocks but the config "
                         f"needs {hf_shape}; the file's metadata and tensors disagree")
    order = processor.process(weights=np.arange(rows).reshape(rows, 1), name=tensor.name).weights.reshape(rows)
    if not np.array_equal(order, np.arange(rows)):
        raw = raw[order]
    return GGUFQuantizedTensor(tensor.tensor_type.name, raw, (hf_shape[0], hf_shape[1]))


def _check_gguf_file(path: str | os.PathLike[str]) -> str:
    """The absolute path of an existing GGUF file, or a `ValueError` saying what is wrong with it."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise ValueError(f"GGUF file {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"GGUF path {path} is not a file")
    if not is_gguf_file(path):
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return path


def _open_reader(path: str) -> gguf.GGUFReader:
    """A reader over the memory-mapped file.

    Opening parses all metadata and slices out every tensor, so a file cut short fails here,
    before any tensor is used. (`FastGGUFReader`: gguf's own takes 10-20 s over a 150k-token
    vocabulary.)
    """
    from pagedllm.model_executor.gguf_reader import FastGGUFReader

    try:
        return FastGGUFReader(path)
    except Exception as exc:  # struct/numpy errors from a file cut short or overwritten
        raise ValueError(f"{path} is not a valid GGUF file (truncated or corrupt: {exc})") from None


def _architecture(reader: gguf.GGUFReader, path: str) -> str:
    """The file's `general.architecture`, checked against those this module can map."""
    field = reader.get_field("general.architecture")
    if field is None:
        raise ValueError(f"{path} is not a valid GGUF model: its metadata has no general.architecture")
    architecture = field.contents()
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    experts = reader.get_field(f"{architecture}.expert_count")
    if experts is not None and int(experts.contents()) > 0 and architecture not in MOE_GGUF_ARCHITECTURES:
        # llama.cpp files Mixtral under "llama"; transformers reads such a file as a dense Llama.
        raise ValueError(
            f"{path}: mixture-of-experts GGUF files ({architecture} with {int(experts.contents())} experts, e.g. "
            "Mixtral) are not supported: transformers cannot read their experts; load the safetensors checkpoint"
        )
    return architecture


@functools.lru_cache(maxsize=4)
def _cached_config(path: str, size: int, mtime_ns: int) -> PretrainedConfig:
    """Build the config once per file version (`size` and `mtime_ns` only make the cache key).

    transformers parses the metadata with `gguf.GGUFReader` here; `reads_fast` swaps in the
    reader that parses a large vocabulary in bulk (the same fields, a tenth of the time)."""
    from pagedllm.model_executor.gguf_reader import reads_fast

    try:
        with reads_fast():
            config = AutoConfig.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
            )
    except Exception as exc:
        _raise_clear_error(path, "read the model config from", exc)
    supported_types = {t for types in SUPPORTED_GGUF_ARCHITECTURES.values() for t in types}
    if config.model_type not in supported_types:
        raise ValueError(
            f"{path}: GGUF model type {config.model_type!r} is not supported "
            f"(supported GGUF architectures: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    # A GGUF names no model class; say which one, as every config.json does, so callers need not guess.
    if not config.architectures:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def _raise_clear_error(path: str, action: str, exc: Exception) -> NoReturn:
    """Turn a failure inside transformers into the most precise one-line error we can give.

    Re-reading the file with `gguf` pins down corrupt, truncated and unsupported files; only
    if the file looks sound is transformers' own message passed on.
    """
    reader = _open_reader(path)
    _architecture(reader, path)
    raise ValueError(f"could not {action} GGUF file {path}: {type(exc).__name__}: {exc}") from exc


def _gguf_to_hf_names(architecture: str, config: PretrainedConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{gguf tensor name: (Hugging Face parameter name, shape)}` for this config's model.

    The Hugging Face names come from the real model class, built on the meta device (no memory), and
    are translated with llama.cpp's own name table, so nothing here hard-codes a layer's name.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model_arch = next(arch for arch, name in _gguf().MODEL_ARCH_NAMES.items() if name == architecture)
    name_map = _gguf().get_tensor_name_map(model_arch, config.num_hidden_layers)
    targets = {}
    for hf_name, param in model.state_dict().items():
        if hf_name.endswith(".experts.gate_up_proj"):
            # transformers stacks every expert's gate and up in one tensor; llama.cpp keeps
            # `ffn_gate_exps` and `ffn_up_exps` apart: each becomes a stacked [experts, ...] tensor
            # named as transformers' per-projection ones, which the decoder's loader takes.
            num_experts, rows, hidden = param.shape
            parts = [(hf_name.replace("gate_up_proj", part), (num_experts, rows // 2, hidden))
                     for part in ("gate_proj", "up_proj")]
        else:
            parts = [(hf_name, tuple(param.shape))]
        for name, shape in parts:
            gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is not None:
                # a stacked expert tensor's HF name has no suffix; its GGUF name has ".weight"
                suffixed = gguf_name.endswith((".weight", ".bias"))
                targets[gguf_name if suffixed else gguf_name + ".weight"] = (name, shape)
    return targets


def _to_torch(weights: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor that owns its memory: an unquantised GGUF tensor is a read-only view of the mapped file."""
    if not weights.flags.writeable:
        weights = np.array(weights)
    return torch.from_numpy(weights).to(dtype)
