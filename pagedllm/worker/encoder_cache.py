"""The vision encoder's outputs, kept per image so an image is encoded once, not once per chunk or request.

A prompt's image may be split over several prefill chunks, and the same image may come in many
requests (a shared system image, n > 1, a retried request): each time, its rows are taken from here.
Keyed by the image's pixel hash; least recently used images leave first once `max_tokens` rows are
held (vLLM's encoder cache budget, in tokens). Losing an entry only costs a recomputation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch

from pagedllm.multimodal.inputs import MultiModalFeature


class EncoderCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_tokens = 0
        self.num_encoded = 0  # images run through the encoder (for tests and logs)

    def get_many(self, features: list[MultiModalFeature], encode: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device) -> dict[str, torch.Tensor]:
        """Each feature's encoder rows [length, hidden], encoding the missing ones in one batch."""
        missing: dict[str, MultiModalFeature] = {}
        for feature in features:
            if feature.identifier in self.entries:
                self.entries.move_to_end(feature.identifier)
            else:
                missing.setdefault(feature.identifier, feature)
        if missing:
            pixels = torch.from_numpy(np.stack([f.data for f in missing.values()])).to(device)
            encoded = encode(pixels)
            self.num_encoded += len(missing)
            for identifier, rows in zip(missing, encoded):
                self._put(identifier, rows)
        return {f.identifier: self.entries.get(f.identifier) for f in features}

    def _put(self, identifier: str, rows: torch.Tensor) -> None:
        self.entries[identifier] = rows
        self.num_tokens += rows.shape[0]
        while self.num_tokens > self.max_tokens and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.num_tokens -= old.shape[0]


def scatter_image_rows(inputs_embeds: torch.Tensor, placements: list[tuple[int, int, int, MultiModalFeature]],
                       rows_of: dict[str, Any]) -> None:
    """Write each image's encoder rows over its placeholder rows of this step, in place.

    A placement (row, start, n, feature): the request's tokens at positions [start, start + n) sit at
    rows [row, row + n) of the batch; the feature's placeholders at [offset, offset + length) overlap
    them in part (a chunk may begin or end inside an image's run)."""
    for row, start, n, feature in placements:
        lo, hi = max(start, feature.offset), min(start + n, feature.offset + feature.length)
        encoded = rows_of[feature.identifier]
        inputs_embeds[row + lo - start : row + hi - start] = encoded[lo - feature.offset : hi - feature.offset].to(
            inputs_embeds.dtype)
