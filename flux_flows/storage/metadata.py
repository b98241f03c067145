"""S3 user metadata (prompt, seed, model, finish reason) that S3 accepts for any prompt.

S3 rejects non-ASCII header values and a metadata set over 2 KB, which would fail the upload of
an image already paid for; the manifest keeps every field whole, so here they are encoded and,
if need be, truncated.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from urllib.parse import quote

__all__ = [
    "FIELD_VALUE_MAX",
    "PROMPT_FIELD",
    "PROMPT_HASH_FIELD",
    "ROW_FIELDS_MAX",
    "S3_METADATA_LIMIT",
    "TRUNCATION_MARKER",
    "metadata_size",
    "row_metadata",
    "s3_metadata",
]

S3_METADATA_LIMIT = 2048
_META_PREFIX_LEN = len("x-amz-meta-")
TRUNCATION_MARKER = "...[truncated]"
PROMPT_FIELD = "prompt"
PROMPT_HASH_FIELD = "prompt-sha256"
# Any one other field (a user's id, an error text) may take at most this much, so the prompt
# always keeps most of the 2 KB.
FIELD_VALUE_MAX = 256
# The row's id and kept columns (`row-<column>`) share this much, so the prompt keeps the rest.
ROW_FIELDS_MAX = 1024
ROW_PREFIX = "row-"
# Printable ASCII stays readable; '%' is escaped (so `unquote` reverses exactly), as are control
# characters and everything non-ASCII.
_SAFE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_PLAIN_TEXT = re.compile(r"[\x20-\x24\x26-\x7e]*")  # exactly the characters in _SAFE_CHARS


@functools.lru_cache(maxsize=256)
def _metadata_key(name: str) -> str:
    """Field names come from a short fixed list, so each is normalised once per process."""
    key = re.sub(r"[^a-z0-9-]+", "-", str(name).lower()).strip("-")
    if not key:
        raise ValueError(f"metadata field name {name!r} has no usable characters [a-z0-9-]")
    return key


def _metadata_value_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _encode_chars(text: str) -> list[str]:
    """Percent-encode per character, so truncation can only cut between whole characters.

    Leading/trailing spaces are escaped too: HTTP trims them from header values, which would
    make the value irreversible.
    """
    # Nearly every prompt is plain printable ASCII, where each character encodes to itself:
    # one regex check instead of a `quote` call per character (58 -> 15 us per call in an
    # uncommitted A/B of issue 17, benchmarks/RESULTS.md).
    if _PLAIN_TEXT.fullmatch(text):
        chunks = list(text)
    else:
        chunks = [quote(ch, safe=_SAFE_CHARS) for ch in text]
    for index in (0, len(chunks) - 1):
        if chunks and chunks[index] == " ":
            chunks[index] = "%20"
    return chunks


def _fit(chunks: list[str], budget: int) -> str | None:
    """The encoded value if it fits, else the longest whole-character prefix plus the marker."""
    full = "".join(chunks)
    if len(full) <= budget:
        return full
    room = budget - len(TRUNCATION_MARKER)
    if room < 0:
        return None
    kept: list[str] = []
    used = 0
    for chunk in chunks:
        if used + len(chunk) > room:
            break
        kept.append(chunk)
        used += len(chunk)
    return "".join(kept) + TRUNCATION_MARKER


def s3_metadata(fields: Mapping[str, object]) -> dict[str, str]:
    """S3-safe user metadata: ASCII keys [a-z0-9-], reversible ASCII values, total within 2 KB.

    S3 rejects non-ASCII header values and a metadata set over 2 KB, which would fail an upload
    of an image already paid for. The short fields are placed first, the prompt gets whatever
    room is left (other fields are capped at `FIELD_VALUE_MAX` each) and is truncated (on a
    character boundary, with a marker) if needed; the full prompt stays in the manifest, and
    `prompt-sha256` of the whole prompt links the two. The size counts UTF-8 bytes of keys and
    values plus the `x-amz-meta-` prefix of each key.
    `None` values are left out.
    """
    entries: dict[str, list[str]] = {}
    prompt: str | None = None
    for name, value in fields.items():
        if value is None:
            continue
        key = _metadata_key(name)
        if key in entries or (key == PROMPT_FIELD and prompt is not None):
            raise ValueError(f"metadata fields collide on the key {key!r}")
        text = _metadata_value_text(value)
        if key == PROMPT_FIELD:
            prompt = text
        elif key != PROMPT_HASH_FIELD:
            entries[key] = _encode_chars(text)

    result: dict[str, str] = {}
    budget = S3_METADATA_LIMIT
    if prompt is not None:
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        result[PROMPT_HASH_FIELD] = digest
        budget -= _META_PREFIX_LEN + len(PROMPT_HASH_FIELD) + len(digest)
    for key, chunks in entries.items():
        value = _fit(chunks, min(FIELD_VALUE_MAX, budget - _META_PREFIX_LEN - len(key)))
        if value is None:
            continue
        result[key] = value
        budget -= _META_PREFIX_LEN + len(key) + len(value)
    if prompt is not None:
        value = _fit(_encode_chars(prompt), budget - _META_PREFIX_LEN - len(PROMPT_FIELD))
        if value is not None:
            result[PROMPT_FIELD] = value
    return result


def row_metadata(
    item_id: str | None, columns: Mapping[str, str] | None
) -> tuple[tuple[str, str], ...]:
    """The prompt row's id and kept columns as `row-<column>` fields, for `s3_metadata`.

    Column names are the user's: one with no usable character, or whose key another already
    took ("SKU" after "sku"), is left out rather than failing the upload of a paid image, as are
    the columns past `ROW_FIELDS_MAX`; the manifest keeps them all.
    """
    named = {"id": item_id} if item_id is not None else {}
    fields: dict[str, str] = {}
    used = 0
    for name, value in {**named, **(columns or {})}.items():
        try:
            key = ROW_PREFIX + _metadata_key(name)
        except ValueError:
            continue
        size = (
            _META_PREFIX_LEN + len(key) + min(FIELD_VALUE_MAX, len("".join(_encode_chars(value))))
        )
        if key in fields or used + size > ROW_FIELDS_MAX:
            continue
        fields[key] = value
        used += size
    return tuple(fields.items())


def metadata_size(metadata: Mapping[str, str]) -> int:
    """Bytes S3 counts against its 2 KB limit, plus the header prefix we count to be safe."""
    return sum(
        _META_PREFIX_LEN + len(k.encode("utf-8")) + len(v.encode("utf-8"))
        for k, v in metadata.items()
    )
