"""A prompt row: the fields one prompt sets, and which fields a row may set at all.

Its own module so the readers (`sources` for text, CSV and JSONL; `tables` for Parquet) and the
templates that fill a row's prompt from its columns share it without importing each other.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from flux_flows.models import ImageRequest

__all__ = ["ALLOWED_FIELDS", "OVERRIDE_FIELDS", "SUPPORTED_EXTENSIONS", "PromptRow"]

# Per-prompt overrides are exactly the request fields besides the prompt, so a new field on
# ImageRequest becomes a valid column without touching this module.
OVERRIDE_FIELDS: tuple[str, ...] = tuple(
    name for name in ImageRequest.model_fields if name != "prompt"
)
ALLOWED_FIELDS: tuple[str, ...] = ("prompt", "id", *OVERRIDE_FIELDS)
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".txt", ".csv", ".jsonl", ".ndjson", ".parquet")


class PromptRow(NamedTuple):
    """One prompt with its overrides, and where it came from for error messages.

    `index` and `variant` are set only for a replayed record, which keeps its place in the
    manifest it came from.
    """

    fields: dict[str, Any]
    where: str
    index: int | None = None  # type: ignore[assignment]  # typeshed's tuple.index; the field wins at runtime
    variant: int | None = None
    columns: dict[str, str] | None = None  # kept columns (`planning.templates`), for the manifest
