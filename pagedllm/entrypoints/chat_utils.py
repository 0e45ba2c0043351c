"""Chat messages with images, for the offline `LLM.chat` and the server alike.

OpenAI's content parts (`{"type": "text", ...}`, `{"type": "image_url", "image_url": {"url": ...}}`)
and vLLM's offline extras (`{"type": "image_pil", "image_pil": <PIL image>}`, `{"type": "image_url",
"image_url": <PIL image>}`) become one string per message, as vLLM's "string" content format does:
each image part leaves the model's image token (LLaVA's `<image>`) where it stood, the parts joined by
newlines, and the images go, in order, to the prompt's `multi_modal_data`. The chat template then
only ever sees strings, so any template renders them.
"""

from __future__ import annotations

from typing import Any, Optional

IMAGE_PART_TYPES = ("image_url", "image_pil", "image")


class ChatContentError(ValueError):
    """A content part that cannot be used; `index` is the message's."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def image_placeholder(tokenizer: Any, hf_config: Any) -> Optional[str]:
    """The text of a vision-language model's image token (None: the model takes no images)."""
    token_id = getattr(hf_config, "image_token_index", None)
    if token_id is None or getattr(hf_config, "vision_config", None) is None:
        return None
    return tokenizer.convert_ids_to_tokens(token_id)


def flatten_content(content: Any, index: int, placeholder: Optional[str]) -> tuple[str, list[Any]]:
    """A message's content as one string, and its images (PIL images or URL strings) in order."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ChatContentError(f"message content must be a string or a list of parts, got {type(content).__name__}",
                               index)
    texts: list[str] = []
    images: list[Any] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in IMAGE_PART_TYPES:
            if placeholder is None:
                raise ChatContentError(f"this model takes text only; content parts of type {kind!r} need a "
                                       "vision-language model", index)
            images.append(_image_source(part, kind, index))
            texts.append(placeholder)
        else:
            raise ChatContentError(f"unsupported content part type {kind!r} (text, image_url and image_pil are)",
                                   index)
    return "\n".join(texts), images


def _image_source(part: dict, kind: str, index: int) -> Any:
    value = part.get(kind)
    if kind == "image_url" and isinstance(value, dict):
        value = value.get("url")
    if value is None or (isinstance(value, str) and not value):
        raise ChatContentError(f"the {kind} part has no image", index)
    return value
