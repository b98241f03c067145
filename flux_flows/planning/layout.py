"""Where each object of a run lives under the destination, derived only from the cache key.

Because the key of an image is a pure function of its request, a re-run on a fresh machine can
find finished work with one listing of the destination and no database.

    <destination>/images/<slug>-<cache_key>.<ext>     real images
    <destination>/filtered/<slug>-<cache_key>.<ext>   CONTENT_FILTERED answers (paid for, not real)
    <destination>/thumbs/<cache_key>.jpg              thumbnails
    <destination>/runs/<run_id>/manifest.jsonl        one run's manifest (and its contact sheet)
    <destination>/manifest.jsonl                      the latest run's manifest, for downstream jobs
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from flux_flows.models import FinishReason, ImageRequest

IMAGES = "images/"
FILTERED = "filtered/"
THUMBS = "thumbs/"
RUNS = "runs/"
MANIFEST = "manifest.jsonl"
CONTACT_SHEET = "contact-sheet.html"
EXTENSIONS = {"jpeg": "jpg", "png": "png"}

_CACHE_KEY_IN_NAME = re.compile(r"([0-9a-f]{32})\.[a-z0-9]+$")
_SLUG_CHARS = re.compile(r"[^a-z0-9]+")


def slug(prompt: str, limit: int = 40) -> str:
    """A readable, ASCII, path-safe hint of the prompt, for people browsing the bucket."""
    text = _SLUG_CHARS.sub("-", prompt.lower()).strip("-")
    return text[:limit].rstrip("-") or "image"


def image_key(request: ImageRequest, finish_reason: FinishReason = FinishReason.SUCCESS) -> str:
    folder = FILTERED if finish_reason is FinishReason.CONTENT_FILTERED else IMAGES
    ext = EXTENSIONS[request.output_format]
    return f"{folder}{slug(request.prompt)}-{request.cache_key}.{ext}"


def thumbnail_key(cache_key: str) -> str:
    return f"{THUMBS}{cache_key}.jpg"


def cache_key_of(object_key: str) -> str | None:
    """The cache key an object name carries, whatever readable prefix it was given."""
    match = _CACHE_KEY_IN_NAME.search(object_key)
    return match.group(1) if match else None


def keys_by_cache_key(object_keys: set[str]) -> dict[str, str]:
    return {ck: key for key in object_keys if (ck := cache_key_of(key))}


def new_run_id(flow_run_name: str | None = None) -> str:
    """Sortable by time, readable, and unique enough for concurrent runs into one destination."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{slug(flow_run_name or 'run', 30)}"


def run_manifest_key(run_id: str) -> str:
    return f"{RUNS}{run_id}/{MANIFEST}"


def run_contact_sheet_key(run_id: str) -> str:
    return f"{RUNS}{run_id}/{CONTACT_SHEET}"
