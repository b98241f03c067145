"""Picking a backend from a URI: `s3://...` goes to S3, anything else is a local path.

Prompt files, input images and manifests are read with `read_uri`/`list_uri` and images are
stored through `open_storage`, so S3 clients, retries and error explanations live in this package
only. This module imports both backends; they import only the types in `base`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from flux_flows.storage.base import Storage
from flux_flows.storage.local import LocalStorage, iter_file_lines, list_folder, read_file
from flux_flows.storage.s3 import S3Storage, iter_object_keys, iter_object_lines, read_object

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials

__all__ = [
    "is_s3_uri",
    "iter_uri_lines",
    "list_uri",
    "open_storage",
    "read_uri",
    "split_s3_uri",
]


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------


def is_s3_uri(uri: str) -> bool:
    """Case-insensitive, as users type `S3://` too; every other string is a local path."""
    return uri[:5].lower() == "s3://"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; either may be empty, for the caller to word the error."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def read_uri(
    uri: str,
    *,
    aws_credentials: AwsCredentials | None = None,
    max_bytes: int | None = None,
    action: str = "read",
    head: int | None = None,
) -> bytes:
    """The bytes of an `s3://bucket/key` object or a local file (`~` expanded).

    `max_bytes` refuses a bigger object before downloading it (`TooLargeError`); `action` ends the
    S3 explanation's "wanted to ..." so it says what the object was for; `head` reads only the
    first bytes of a local file (a cheap "is it an image" check). Raises `ReadError`.
    """
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        if not bucket or not key:
            raise ValueError(f"{uri}: an S3 URI to read must name an object, s3://BUCKET/KEY")
        return read_object(
            bucket, key, aws_credentials=aws_credentials, max_bytes=max_bytes, action=action
        )
    return read_file(Path(uri).expanduser(), max_bytes=max_bytes, head=head)


def iter_uri_lines(
    uri: str, *, aws_credentials: AwsCredentials | None = None, keepends: bool = False
) -> Iterator[bytes]:
    """The lines of an `s3://` object or a local file, read as a stream (a 100,000-line manifest
    is never held whole). Raises `ReadError`, as `read_uri` does.

    With `keepends`, each line keeps its end (an S3 line may end in \\r alone; a file's lines
    end at \\n only), for readers that split lines their own way, such as CSV."""
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        if not bucket or not key:
            raise ValueError(f"{uri}: an S3 URI to read must name an object, s3://BUCKET/KEY")
        yield from iter_object_lines(
            bucket, key, aws_credentials=aws_credentials, keepends=keepends
        )
        return
    yield from iter_file_lines(Path(uri).expanduser())


def list_uri(uri: str, *, aws_credentials: AwsCredentials | None = None) -> list[str]:
    """URIs of what is under an `s3://bucket/prefix` or in a local folder, sorted.

    S3 has no folders: every key that starts with the prefix is listed, "folder" markers too. A
    folder lists the files directly in it (`NotFoundError` if it is not a folder). Raises
    `ReadError`.
    """
    if is_s3_uri(uri):
        bucket, prefix = split_s3_uri(uri)
        if not bucket:
            raise ValueError(f"{uri}: no bucket name; use s3://BUCKET/PREFIX")
        keys = iter_object_keys(bucket, prefix, aws_credentials=aws_credentials)
        return [f"s3://{bucket}/{key}" for key in sorted(keys)]
    return list_folder(Path(uri).expanduser())


# --------------------------------------------------------------------------------------------
# Destinations
# --------------------------------------------------------------------------------------------

# Permissive on purpose: S3-compatible stores and legacy us-east-1 buckets allow more than the
# modern AWS rules; this only catches obvious mistakes such as spaces or a missing name.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _open_s3(destination: str, aws_credentials: AwsCredentials | None) -> S3Storage:
    bucket, prefix = split_s3_uri(destination)
    if not bucket:
        raise ValueError(
            f"destination {destination!r} has no bucket name: use s3://BUCKET or s3://BUCKET/PREFIX"
        )
    if not _BUCKET_RE.match(bucket):
        raise ValueError(
            f"destination {destination!r}: {bucket!r} is not a valid bucket name (letters, "
            "digits, '.', '-', '_'; at least 3 characters)"
        )
    return S3Storage(bucket, prefix, aws_credentials=aws_credentials)


def _open_file_uri(destination: str) -> LocalStorage:
    parsed = urlparse(destination)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(
            f"destination {destination!r}: file:// URIs must name a local path, e.g. file:///data/images"
        )
    if not parsed.path:
        raise ValueError(f"destination {destination!r} has no path")
    return LocalStorage(unquote(parsed.path))


def open_storage(destination: str, *, aws_credentials: AwsCredentials | None = None) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; a folder path or `file://` URI -> LocalStorage.

    Other schemes (gs://, http://) are refused instead of silently becoming a local folder
    named "gs:".
    """
    if not isinstance(destination, str) or not destination.strip():
        raise ValueError("destination is empty: pass s3://BUCKET/PREFIX or a local folder")
    destination = destination.strip()
    match = _SCHEME_RE.match(destination)
    scheme = match.group(1).lower() if match else None
    if scheme == "s3":
        return _open_s3("s3://" + destination[len("s3://") :], aws_credentials)
    if scheme == "file":
        return _open_file_uri(destination)
    if scheme is not None:
        raise ValueError(
            f"destination {destination!r}: unsupported scheme '{scheme}://' (use "
            "s3://BUCKET/PREFIX or a local folder)"
        )
    return LocalStorage(destination)
