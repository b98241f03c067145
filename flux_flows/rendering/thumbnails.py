"""Thumbnails made at upload time, from the bytes already in memory.

Contact sheets and the summary artifact show hundreds of images at once; full-size FLUX images
(1-2 MP, 100-400 KB) would make those pages slow. Making the thumbnail while the image is still in
memory costs a few ms of CPU and no extra download; making it later would mean fetching every
image again.

A thumbnail is a convenience, never part of what was paid for: `store_thumbnail` logs and returns
None on any failure so that it can never fail, or spill, the image it belongs to.
"""

from __future__ import annotations

import io
import logging

from PIL import Image

from flux_flows.planning import layout
from flux_flows.storage import Storage

LONG_SIDE = 256
JPEG_QUALITY = 82
CONTENT_TYPE = "image/jpeg"

logger = logging.getLogger("flux_flows.rendering.thumbnails")


def thumbnail_size(width: int, height: int, long_side: int = LONG_SIDE) -> tuple[int, int]:
    """(width, height) scaled so the long side is `long_side`; never upscaled, never zero."""
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def make_thumbnail(data: bytes, long_side: int = LONG_SIDE) -> bytes:
    """A JPEG whose long side is `long_side` px, from JPEG or PNG bytes.

    For JPEG sources `Image.draft` asks libjpeg to decode at 1/2, 1/4 or 1/8 scale (the largest
    reduction that still covers the target), which skips most of the decode work: a 1024 px
    FLUX image decodes straight to 256 px. The final resize is then a small one.
    """
    with Image.open(io.BytesIO(data)) as source:
        target = thumbnail_size(source.width, source.height, long_side)
        source.draft("RGB", target)
        image = source.convert("RGB") if source.mode != "RGB" else source
        if image.size != target:
            image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=False)
    return out.getvalue()


def store_thumbnail(storage: Storage, cache_key: str, data: bytes) -> tuple[str, str] | None:
    """Make and store the thumbnail of one stored image; (key, uri), or None if it failed.

    Any failure (undecodable bytes, a storage error) is logged and swallowed: the image itself
    is already stored, and a page without this thumbnail falls back to the full image.
    """
    key = layout.thumbnail_key(cache_key)
    try:
        thumbnail = make_thumbnail(data)
        uri = storage.put(key, thumbnail, content_type=CONTENT_TYPE)
    except Exception as exc:
        logger.warning("no thumbnail for %s (the image itself is stored): %s", cache_key, exc)
        return None
    return key, uri
