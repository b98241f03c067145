"""The storage interface every backend implements, and the errors a read can raise.

Kept apart from `uris` (which picks a backend from a URI) so the backends import the types
without importing each other: dependencies run one way, types <- backends <- uris.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from flux_flows.errors import StorageError

Metadata = Mapping[str, str] | None
"""User metadata for an object: S3-safe already (see `s3_metadata`); local folders ignore it."""

__all__ = [
    "IsAFolderError",
    "Metadata",
    "NotFoundError",
    "ReadError",
    "Storage",
    "TooLargeError",
    "check_key",
]


@runtime_checkable
class Storage(Protocol):
    """What the flow needs from a destination; keys are relative to `root_uri`, '/'-separated."""

    root_uri: str

    def uri_for(self, key: str) -> str: ...

    def list_keys(self, prefix: str = "") -> set[str]: ...

    def exists(self, key: str) -> bool: ...

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: Metadata = None
    ) -> str: ...

    def put_file(self, key: str, path: Path, *, content_type: str) -> str: ...

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes: ...

    def create(self, key: str, data: bytes, *, content_type: str) -> bool: ...

    def age_s(self, key: str) -> float | None: ...

    def delete(self, key: str) -> None: ...

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None: ...

    def check_writable(self) -> None: ...


def check_key(key: str) -> str:
    """Refuse keys that would escape the root (`..`, absolute) or alias another key (`a//b`)."""
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string such as 'images/ab/abcd.jpg'")
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"storage key {key!r} must be relative and '/'-separated, without empty, '.' or "
            "'..' segments"
        )
    return key


# --------------------------------------------------------------------------------------------
# Read errors
# --------------------------------------------------------------------------------------------


class ReadError(StorageError):
    """Reading or listing a URI failed.

    `reason` is the failure without the "could not read X" frame, so that each caller can word it
    with its own noun ("cannot read input image X: <reason>"), as its users have always read it.
    For S3 it is the whole explanation (it names the bucket or key); for a local path, the OS's.
    """

    def __init__(
        self, message: str, *, reason: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.reason = message if reason is None else reason


class NotFoundError(ReadError):
    """Nothing at a local path: its own class because callers say "does not exist" themselves.

    A missing S3 key or bucket stays a plain `ReadError`: its explanation (NoSuchKey or
    NoSuchBucket, which fix) says more than a class would.
    """


class IsAFolderError(ReadError):
    """A local path to read is a folder: a different fix (name a file in it) than a missing one."""


class TooLargeError(ReadError):
    """Over the caller's `max_bytes`; for S3 found from the object's size, before the download."""

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size
