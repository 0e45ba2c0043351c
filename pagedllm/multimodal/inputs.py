"""What a request carries for each of its images, from the frontend to the model runner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MultiModalFeature:
    """One image of a prompt: its preprocessed pixels, where its placeholder run sits in the prompt,
    and a hash of its pixels.

    `identifier` keys the runner's encoder cache (an image shared by requests is encoded once) and
    goes into the prefix-cache hashes of the blocks its placeholders fill, so two prompts with the
    same text and different images never share KV blocks.
    """

    modality: str  # "image"
    data: np.ndarray  # the image processor's output for this image, e.g. pixel values [3, H, W]
    identifier: str  # sha256 of the image's pixels, as hex
    offset: int  # position of the first placeholder token in the prompt
    length: int  # placeholder tokens: the rows of encoder output this image fills

    def overlaps(self, start: int, end: int) -> bool:
        """Whether positions [start, end) include some of this image's placeholders."""
        return self.offset < end and start < self.offset + self.length
