"""A faster `gguf.GGUFReader`: the same fields and tensors, with metadata arrays parsed in bulk.

`gguf.GGUFReader` makes a numpy view of the memory map for every element of every metadata
array. A real vocabulary is ~150k tokens, ~150k merges and ~150k token types, so opening
Qwen2.5-0.5B's GGUF costs about a million views: 10-20 s on this VM, and transformers' config
parser opens the file once more. `FastGGUFReader` reads an array's numbers with one
`np.frombuffer` and walks its strings with `struct`, giving each element the part transformers'
and gguf's own readers index (a 1-element array, the string's bytes as a uint8 view), so what they compute
from the fields is unchanged; everything else (scalars, the tensor table) is gguf's code.

transformers builds a GGUF config through `load_gguf_checkpoint`, which opens the file with
`gguf.GGUFReader` itself; `reads_fast` points that name at `ConfigGGUFReader` (which also leaves
out the tokenizer arrays no config is built from) for the duration of such a call, under a lock:
it is module state of the gguf package.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from typing import Any, Iterator

import numpy as np

import gguf
from gguf import GGUFValueType

# GGUF value type -> the numpy type of its elements (the fixed-size ones)
_SCALARS: dict[GGUFValueType, type] = gguf.GGUFReader.gguf_scalar_to_np
_LOCK = threading.Lock()


class FastGGUFReader(gguf.GGUFReader):
    """`gguf.GGUFReader` with bulk parsing of metadata arrays (file in the host's byte order)."""

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[GGUFValueType]]:
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        count, itype = int(alen[0]), GGUFValueType(int(raw_itype[0]))
        offs = orig_offs + 12
        parts: list[Any] = [raw_itype, alen]
        plain = self.data.view(np.ndarray)  # views of a plain array cost a fraction of a memmap's
        if itype in _SCALARS:
            values = plain[offs:].view(np.uint8)[: count * np.dtype(_SCALARS[itype]).itemsize].view(_SCALARS[itype])
            parts += list(values.reshape(count, 1))  # one [1] array per element, as gguf's parts
            data = list(range(2, 2 + count))
            offs += values.nbytes
        elif itype == GGUFValueType.STRING:
            buf = memoryview(plain)
            data = []
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", buf, offs)
                parts.append(np.array([length], dtype=np.uint64))  # the length part, as gguf's
                parts.append(plain[offs + 8: offs + 8 + length])
                data.append(len(parts) - 1)
                offs += 8 + length
        else:  # nested arrays: no model file has them; gguf's own walk handles them
            return super()._get_field_parts(orig_offs, raw_type)
        types = [GGUFValueType.ARRAY, itype] if count else [GGUFValueType.ARRAY]
        return offs - orig_offs, parts, data, types


# Tokenizer arrays a config is never built from: transformers' config parse only files them under
# its tokenizer parameters (a config reads the token ids, and the token list's length).
TOKENIZER_ONLY_FIELDS = ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


class ConfigGGUFReader(FastGGUFReader):
    """`FastGGUFReader` without `TOKENIZER_ONLY_FIELDS`: transformers turns every element of every
    field into a Python value (~1M calls for a 150k vocabulary), and these two thirds of them
    cannot change a config."""

    def __init__(self, path, mode="r") -> None:
        super().__init__(path, mode)
        for name in TOKENIZER_ONLY_FIELDS:
            self.fields.pop(name, None)


@contextlib.contextmanager
def reads_fast() -> Iterator[None]:
    """Within this block, code that opens a GGUF with `gguf.GGUFReader` to build a config
    (transformers' `load_gguf_checkpoint(return_tensors=False)`) gets a `ConfigGGUFReader`."""
    with _LOCK:
        original = gguf.GGUFReader
        gguf.GGUFReader = ConfigGGUFReader
        try:
            yield
        finally:
            gguf.GGUFReader = original
