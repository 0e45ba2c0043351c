"""Reading the images users send: PIL images, data URLs and, only where allowed, http(s) URLs.

Every way an image can be wrong ends in a `ValueError` whose message says what was wrong (the
server answers it with a 400): an undecodable payload, more bytes than `PAGEDLLM_MAX_IMAGE_BYTES`
(10 MiB unless set), more pixels than Pillow's decompression-bomb limit, or a URL whose host was
not allowed (`--allowed-media-domains`: no URL is ever fetched unless its domain is listed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from typing import Any, Optional
from urllib.parse import urlparse

MAX_IMAGE_BYTES_ENV = "PAGEDLLM_MAX_IMAGE_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 10 * 2**20
FETCH_TIMEOUT_S = 10.0


def max_image_bytes() -> int:
    return int(os.environ.get(MAX_IMAGE_BYTES_ENV, DEFAULT_MAX_IMAGE_BYTES))


def load_image(source: Any, allowed_domains: Optional[frozenset[str]] = None) -> Any:
    """A PIL image (RGB) from a PIL image, raw bytes, a data URL or an allowed http(s) URL."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return _checked(source)
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source))
    if not isinstance(source, str):
        raise ValueError(f"an image must be a PIL image, bytes or a URL string, got {type(source).__name__}")
    if source.startswith("data:"):
        return _decode(_data_url_bytes(source))
    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        return _decode(_fetch(source, allowed_domains or frozenset()))
    raise ValueError(f"unsupported image URL {source[:60]!r}: use a data URL (data:image/png;base64,...)"
                     + (" or an http(s) URL of an allowed domain" if allowed_domains else ""))


def image_hash(image: Any) -> str:
    """sha256 of the image's mode, size and pixels: equal images hash alike whatever their encoding."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError("an image data URL must look like data:image/<type>;base64,<data>")
    limit = max_image_bytes()
    if len(payload) * 3 // 4 > limit:
        raise ValueError(f"the image is larger than the {limit}-byte limit ({MAX_IMAGE_BYTES_ENV})")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image data URL is not valid base64") from None


def _fetch(url: str, allowed_domains: frozenset[str]) -> bytes:
    host = urlparse(url).hostname or ""
    if host not in allowed_domains:
        raise ValueError(f"fetching images from {host or url[:60]!r} is not allowed"
                         + (f"; allowed domains: {sorted(allowed_domains)}" if allowed_domains else
                            "; start the server with --allowed-media-domains to allow it, or send a data URL"))
    import httpx

    limit = max_image_bytes()
    try:
        with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=False) as response:
            if response.status_code != 200:
                raise ValueError(f"fetching the image failed: HTTP {response.status_code} from {host}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ValueError(f"the image is larger than the {limit}-byte limit ({MAX_IMAGE_BYTES_ENV})")
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise ValueError(f"fetching the image from {host} failed: {type(e).__name__}") from None
    return b"".join(chunks)


def _decode(data: bytes) -> Any:
    from PIL import Image, UnidentifiedImageError

    limit = max_image_bytes()
    if len(data) > limit:
        raise ValueError(f"the image is larger than the {limit}-byte limit ({MAX_IMAGE_BYTES_ENV})")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"the image has too many pixels: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"the image could not be decoded ({type(e).__name__})") from None
    return _checked(image)


def _checked(image: Any) -> Any:
    from PIL import Image

    if image.width < 1 or image.height < 1:
        raise ValueError("the image is empty")
    if image.width * image.height > (Image.MAX_IMAGE_PIXELS or 2**31):
        raise ValueError(f"the image has too many pixels ({image.width}x{image.height})")
    return image.convert("RGB") if image.mode != "RGB" else image
