"""Input images for FLUX Kontext edits: reading one reference, hashing it, listing a folder.

A reference is a local path, `s3://bucket/key`, an `http(s)://` URL or a `data:image/...;base64,`
URI. The batch identifies an edit by the SHA-256 of the image's *bytes*, never by its name, so the
same photo under two names is generated (and paid for) once, and a changed photo under an old
name is generated again. Bytes are read, hashed and dropped: the request carries only the
reference and the hash, and the client reads the bytes again at send time, so a batch of
thousands of edits never holds thousands of images in memory.

A prompt file may be someone else's, so a reference is treated as hostile: a local path is read
only if it is a regular file (not /dev/zero, a FIFO or a link to one) and under
`MAX_INPUT_IMAGE_BYTES`; a URL only over http(s), to public addresses, redirects checked hop by
hop, its body capped as it streams (`public_urls`; FLUX_FLOWS_ALLOW_PRIVATE_URLS=1 lifts the
address check for a user's own intranet or a local test server); other schemes are refused.

The cache key of a URL input is the SHA-256 of the bytes the URL serves, as for any other
reference, so planning (the batch, and `flux-flows plan`, which needs no key) downloads each
distinct URL once: without the content it cannot tell a stored image from a changed one. The
client downloads it again at send time and refuses to send if the bytes changed in between.

This module imports neither the client nor Prefect at import time: `models` uses it from a validator.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from flux_flows.inputs.public_urls import (
    UrlFetchError,
    UrlRefused,
    UrlTooLarge,
    fetch_public_url,
    shown_url,
)
from flux_flows.storage import (
    IsAFolderError,
    NotFoundError,
    ReadError,
    TooLargeError,
    list_uri,
    read_uri,
    split_s3_uri,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_INPUT_IMAGE_BYTES",
    "InputImageError",
    "check_input_image",
    "describe_reference",
    "hash_input_images",
    "input_image_kind",
    "list_input_images",
    "normalize_reference",
    "resolve_input_image",
    "sha256_hex",
    "sniff_image_type",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
# Kontext's own limit is not published; 20 MiB keeps the JSON body (base64: x4/3) under ~27 MB.
MAX_INPUT_IMAGE_BYTES = 20 * 1024 * 1024
URL_TIMEOUT_S = 30.0
URL_DEADLINE_S = 120.0
# A list of references in a file (`staging` writes one for a list too long for a parameter):
# data URIs in it may be ~27 MB each.
LIST_FILE_SUFFIX = ".jsonl"
MAX_LIST_FILE_BYTES = 1024 * 1024 * 1024
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class InputImageError(ValueError):
    """An input image cannot be read or is not an image; the message names the reference.

    A ValueError so that pydantic reports it against the `input_image` field and the CLI exits
    with its "bad input" code.
    """


def input_image_kind(ref: str) -> str:
    """ "data", "s3", "url" or "path": how a reference is read."""
    lowered = ref[:10].lower()
    if lowered.startswith("data:"):
        return "data"
    if lowered.startswith("s3://"):
        return "s3"
    if lowered.startswith(("http://", "https://")):
        return "url"
    return "path"


def describe_reference(ref: str, limit: int = 80) -> str:
    """A reference fit for a message: data URIs are megabytes, presigned URLs carry secrets."""
    if input_image_kind(ref) == "data":
        return ref.split(",", 1)[0] + ",... (" + f"{len(ref)} characters)"
    if input_image_kind(ref) == "url":
        ref = shown_url(ref)
    return ref if len(ref) <= limit else ref[: limit - 3] + "..."


def normalize_reference(ref: str) -> str:
    """Local paths become absolute (workers may run elsewhere); other references stay as given."""
    ref = ref.strip()
    if not ref:
        raise InputImageError("the input image reference is empty")
    scheme = _SCHEME_RE.match(ref)
    if scheme and input_image_kind(ref) == "path":
        raise InputImageError(
            f"{describe_reference(ref)}: input images are local paths, s3://, http(s):// or "
            f"data: URIs, not {scheme.group(0)}"
        )
    if input_image_kind(ref) == "s3":
        bucket, key = split_s3_uri(ref)
        if not bucket or not key or key.endswith("/"):
            raise InputImageError(f"{ref}: an S3 input image must name an object, s3://BUCKET/KEY")
        return f"s3://{bucket}/{key}"
    if input_image_kind(ref) == "path":
        return str(Path(ref).expanduser().absolute())
    return ref


def sniff_image_type(data: bytes) -> str | None:
    """The image type the bytes really are (JPEG, PNG or WebP), or None."""
    # The client's sniffer, so the magic bytes live in one place. Imported here, not at the
    # top: `models` imports this module, and the client imports `models`.
    from flux_flows.inputs.sniff import image_type

    return image_type(data)


def _decode_data_uri(ref: str) -> bytes:
    header, sep, payload = ref.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.endswith(";base64"):
        raise InputImageError(
            f"{describe_reference(ref)}: a data URI input must look like data:image/png;base64,<data>"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputImageError(
            f"{describe_reference(ref)}: the data URI is not valid base64 ({exc})"
        ) from exc


def _read_stored(ref: str, aws_credentials: Any) -> bytes:
    """A local file or S3 object; one over the limit is refused from its size, before the read."""
    try:
        return read_uri(
            ref,
            aws_credentials=aws_credentials,
            max_bytes=MAX_INPUT_IMAGE_BYTES,
            action="read the input image",
        )
    except ReadError as exc:
        raise _unreadable(ref, exc) from exc


def _unreadable(ref: str, exc: ReadError) -> InputImageError:
    if isinstance(exc, TooLargeError):
        return InputImageError(_too_big(ref, exc.size))
    if isinstance(exc, NotFoundError):
        return InputImageError(f"input image {ref} does not exist")
    if isinstance(exc, IsAFolderError):
        return InputImageError(f"input image {ref} is a folder, not a file")
    return InputImageError(f"cannot read input image {ref}: {exc.reason}")


def _read_url(ref: str, allow_private_urls: bool | None) -> bytes:
    """A plain GET, no credentials, public addresses only: see `public_urls` for the guards."""
    try:
        return fetch_public_url(
            ref,
            max_bytes=MAX_INPUT_IMAGE_BYTES,
            timeout_s=URL_TIMEOUT_S,
            deadline_s=URL_DEADLINE_S,
            allow_private=allow_private_urls,
        )
    except UrlTooLarge as exc:
        if exc.announced:
            raise InputImageError(_too_big(ref, exc.size)) from exc
        limit = MAX_INPUT_IMAGE_BYTES // (1024 * 1024)
        raise InputImageError(
            f"input image {describe_reference(ref)} is over the limit of {limit} MiB (the "
            f"download was cut at {exc.size / 1024 / 1024:.1f} MiB)"
        ) from exc
    except UrlRefused as exc:
        raise InputImageError(f"input image refused: {exc}") from exc
    except UrlFetchError as exc:
        raise InputImageError(f"cannot download input image {exc}") from exc


def _too_big(ref: str, size: int) -> str:
    limit = MAX_INPUT_IMAGE_BYTES // (1024 * 1024)
    return f"input image {describe_reference(ref)} is {size / 1024 / 1024:.1f} MiB; the limit is {limit} MiB"


def resolve_input_image(
    ref: str, aws_credentials: Any = None, *, allow_private_urls: bool | None = None
) -> tuple[bytes, str]:
    """The bytes of one input image and their real MIME type (sniffed, not guessed from a name).

    `aws_credentials` (a prefect-aws `AwsCredentials` block) is used for `s3://` references;
    without it the standard AWS configuration applies. URLs on private addresses are refused
    unless `allow_private_urls` (default: the FLUX_FLOWS_ALLOW_PRIVATE_URLS environment variable)
    says otherwise. Raises InputImageError.
    """
    kind = input_image_kind(ref)
    if kind == "data":
        data = _decode_data_uri(ref)
    elif kind == "url":
        data = _read_url(ref, allow_private_urls)
    else:
        data = _read_stored(normalize_reference(ref) if kind == "s3" else ref, aws_credentials)
    if len(data) > MAX_INPUT_IMAGE_BYTES:
        raise InputImageError(_too_big(ref, len(data)))
    mime = sniff_image_type(data)
    if mime is None:
        raise InputImageError(
            f"input image {describe_reference(ref)} is not a JPEG, PNG or WebP image ({len(data)} bytes)"
        )
    return data, mime


def check_input_image(ref: str) -> None:
    """Cheap early check of a local file or data URI: it exists and starts like an image.

    Reads 16 bytes of a file (the full read and hash come once, later); S3 objects and URLs are
    checked when the batch hashes them. Raises InputImageError.
    """
    kind = input_image_kind(ref)
    if kind == "data":
        head = _decode_data_uri(ref)[:16]
    elif kind == "path":
        try:
            head = read_uri(ref, max_bytes=MAX_INPUT_IMAGE_BYTES, head=16)
        except ReadError as exc:
            raise _unreadable(ref, exc) from exc
    else:
        return
    if sniff_image_type(head) is None:
        raise InputImageError(
            f"input image {describe_reference(ref)} is not a JPEG, PNG or WebP image"
        )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_input_images(
    refs: Iterable[str], aws_credentials: Any = None, *, allow_private_urls: bool | None = None
) -> dict[str, str]:
    """SHA-256 of each distinct reference's bytes, each read once; every failure reported at once.

    Raises ValueError naming each unreadable (or refused) reference, before anything is generated.
    """
    hashes: dict[str, str] = {}
    problems: list[str] = []
    for ref in dict.fromkeys(refs):
        try:
            data, _ = resolve_input_image(
                ref, aws_credentials, allow_private_urls=allow_private_urls
            )
        except InputImageError as exc:
            problems.append(str(exc))
            continue
        hashes[ref] = sha256_hex(data)
    if problems:
        shown_problems = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{len(problems)} input image(s) cannot be used, nothing was generated:\n  "
            + "\n  ".join(shown_problems)
            + more
        )
    return hashes


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS and not PurePosixPath(
        name
    ).name.startswith(".")


def _list_images(uri: str, source: str, aws_credentials: Any = None) -> list[str]:
    try:
        listed = list_uri(uri, aws_credentials=aws_credentials)
    except NotFoundError as exc:
        raise ValueError(f"input images: {source} is neither a folder nor a file") from exc
    except ReadError as exc:
        raise ValueError(f"cannot list input images in {source}: {exc.reason}") from exc
    return [ref for ref in listed if _is_image_name(ref)]


def _is_list_file(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() == LIST_FILE_SUFFIX


def _read_list_file(uri: str, source: str, aws_credentials: Any) -> list[str]:
    """A `.jsonl` list of references, one JSON string a line (how `staging` sends a long list)."""
    try:
        raw = read_uri(
            uri,
            aws_credentials=aws_credentials,
            max_bytes=MAX_LIST_FILE_BYTES,
            action="read the input image list",
        )
    except ReadError as exc:
        raise ValueError(f"cannot read the input image list {source}: {exc.reason}") from exc
    refs = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ref = json.loads(line)
        except ValueError:
            ref = None
        if not isinstance(ref, str):
            raise ValueError(f"input image list {source} line {number}: not a JSON string")
        refs.append(normalize_reference(ref))
    if not refs:
        raise ValueError(f"the input image list {source} is empty; nothing to edit")
    return refs


def _list_s3(source: str, aws_credentials: Any) -> list[str]:
    bucket, prefix = split_s3_uri(source)
    if not bucket:
        raise ValueError(f"{source}: no bucket name; use s3://BUCKET/PREFIX/")
    if prefix and not prefix.endswith("/"):
        if _is_image_name(prefix):
            return [f"s3://{bucket}/{prefix}"]
        if _is_list_file(prefix):
            return _read_list_file(f"s3://{bucket}/{prefix}", source, aws_credentials)
        prefix += "/"
    return _list_images(f"s3://{bucket}/{prefix}", source, aws_credentials)


def _list_folder(source: str) -> list[str]:
    path = Path(source).expanduser().absolute()
    if path.is_file() and _is_list_file(path.name):
        return _read_list_file(str(path), source, None)
    return [str(path)] if path.is_file() else _list_images(str(path), source)


def list_input_images(source: str | Iterable[str], aws_credentials: Any = None) -> list[str]:
    """The references an edit batch works on, in a stable (sorted) order.

    A list is taken as given (local paths made absolute). A string is a folder or an
    `s3://bucket/prefix/`, listed (not recursively for folders) for .jpg/.jpeg/.png/.webp; a
    string naming one image file or object is that image alone, and one naming a `.jsonl` file
    or object is the list it holds, one reference a line as a JSON string (a list too long for
    a flow-run parameter is sent that way, see `staging`).
    """
    if isinstance(source, str):
        text = source.strip()
        if not text:
            raise ValueError("input_images is empty: pass a folder, s3://BUCKET/PREFIX/ or a list")
        kind = input_image_kind(text)
        if kind == "s3":
            refs = _list_s3(text, aws_credentials)
        elif kind == "path":
            refs = _list_folder(text)
        else:
            refs = [text]
        if not refs:
            raise ValueError(
                f"no input images ({', '.join(IMAGE_EXTENSIONS)}) in {source}; nothing to edit"
            )
        return refs
    refs = []
    for ref in source:
        if not isinstance(ref, str):
            raise TypeError(f"input_images must hold strings, got {type(ref).__name__}")
        refs.append(normalize_reference(ref))
    if not refs:
        raise ValueError("input_images is an empty list; nothing to edit")
    return refs
