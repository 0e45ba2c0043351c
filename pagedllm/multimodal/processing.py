"""From a prompt's token ids and images to the model's input: placeholders expanded, pixels prepared.

The user writes one image token (LLaVA's `<image>`) per image, where the image goes, or lets the chat
template put it there. Each is expanded into the run of `tokens_per_image` placeholder tokens that
the vision encoder's output rows replace in the model runner, as transformers' own processor does.
The pixels come from the checkpoint's image processor (`preprocessor_config.json`), loaded through
transformers with its PIL backend, so torchvision is never needed.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from pagedllm.multimodal.image import image_hash, load_image
from pagedllm.multimodal.inputs import MultiModalFeature

DEFAULT_LIMIT_PER_PROMPT = 999  # vLLM's default for every modality


def tokens_per_image(hf_config: Any) -> int:
    """Encoder rows per image of a LLaVA-style model: one per patch (plus the class token when the
    feature strategy keeps it)."""
    vision = hf_config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if hf_config.vision_feature_select_strategy == "full" else 0)


def load_image_processor(model_path: str) -> Any:
    """The checkpoint's image processor, PIL-based (torchvision's CPU wheels do not match this torch)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_path, backend="pil")
    except TypeError:  # transformers before the `backend` argument
        return AutoImageProcessor.from_pretrained(model_path, use_fast=False)
    except OSError as e:
        raise ValueError(f"the vision-language model at {model_path} has no image processor config "
                         f"(preprocessor_config.json): {e}") from None


class MultiModalProcessor:
    """Expands a prompt's image placeholders and prepares its images, for one model."""

    def __init__(self, model_path: str, hf_config: Any, limit_per_prompt: Optional[dict[str, int]] = None,
                 allowed_media_domains: Optional[frozenset[str]] = None) -> None:
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ValueError("images need Pillow: pip install 'pagedllm[vision]' (or pillow)") from None
        self.image_token_id: int = hf_config.image_token_index
        self.tokens_per_image = tokens_per_image(hf_config)
        self.image_processor = load_image_processor(model_path)
        self.limit = (limit_per_prompt or {}).get("image", DEFAULT_LIMIT_PER_PROMPT)
        self.allowed_media_domains = allowed_media_domains

    def process(self, prompt_token_ids: list[int], images: list[Any]) -> tuple[list[int], list[MultiModalFeature]]:
        """(token ids with every image token expanded, one feature per image in prompt order)."""
        if len(images) > self.limit:
            raise ValueError(f"At most {self.limit} image(s) may be provided in one prompt, got {len(images)} "
                             "(limit_mm_per_prompt)")
        positions = [i for i, t in enumerate(prompt_token_ids) if t == self.image_token_id]
        if len(positions) != len(images):
            raise ValueError(f"the prompt has {len(positions)} image placeholder(s) but {len(images)} image(s) were "
                             "given: put one image token per image in the prompt (or use chat messages)")
        if not images:
            return list(prompt_token_ids), []
        pil_images = [load_image(image, self.allowed_media_domains) for image in images]
        pixels = self.image_processor(images=pil_images, return_tensors="np")["pixel_values"]
        ids: list[int] = []
        features: list[MultiModalFeature] = []
        previous = 0
        for index, position in enumerate(positions):
            ids.extend(prompt_token_ids[previous:position])
            features.append(MultiModalFeature("image", np.ascontiguousarray(pixels[index], dtype=np.float32),
                                               image_hash(pil_images[index]), len(ids), self.tokens_per_image))
            ids.extend([self.image_token_id] * self.tokens_per_image)
            previous = position + 1
        ids.extend(prompt_token_ids[previous:])
        return ids, features
