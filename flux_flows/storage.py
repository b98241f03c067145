"""Where images go: an S3 bucket (boto3) or a local folder, behind one small interface.

Storage objects hold only settings (bucket, prefix, credentials block, folder), never a client, so
they can be pickled into tasks and Dask workers; each process builds its S3 client once and reuses
it (`get_s3_client`). Every failure becomes a `StorageError` whose message names the bucket or key
and says what to do, because a raw botocore traceback in a 10,000-image run helps nobody.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlparse

from flux_flows.errors import StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from prefect_aws import AwsCredentials

__all__ = [
    "LocalStorage",
    "S3Storage",
    "Storage",
    "explain_s3_error",
    "get_s3_client",
    "open_storage",
    "s3_metadata",
]

# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Storage(Protocol):
    """What the flow needs from a destination; keys are relative to `root_uri`, '/'-separated."""

    root_uri: str

    def uri_for(self, key: str) -> str: ...

    def list_keys(self, prefix: str = "") -> set[str]: ...

    def exists(self, key: str) -> bool: ...

    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> str: ...

    def get(self, key: str) -> bytes: ...

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None: ...

    def check_writable(self) -> None: ...


def _check_key(key: str) -> str:
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
# S3 client: one per process and per configuration
# --------------------------------------------------------------------------------------------

# Everything in the environment that changes which endpoint, account or region a client talks to.
_CLIENT_ENV_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
# Part of the identity too, but only ever kept as a digest so no secret sits in a cache key.
_CLIENT_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

DEFAULT_MAX_ATTEMPTS = 5
# The flow uploads from many threads; botocore's default pool of 10 would serialise them.
MAX_POOL_CONNECTIONS = 64

_clients: dict[tuple[Any, ...], tuple[Any, S3Client]] = {}
_clients_lock = threading.Lock()


def _digest(value: str | None) -> str | None:
    return None if value is None else hashlib.sha256(value.encode()).hexdigest()


def _block_fingerprint(block: Any) -> str | int:
    """Identity of a credentials block by its field values, with secrets reduced to digests.

    Keyed on values rather than on the object so that a block loaded again in every task run
    still finds the same client. Objects that are not pydantic models fall back to `id()`; the
    cache keeps them alive, so the id cannot be reused by another object.
    """
    dump = getattr(block, "model_dump", None)
    if dump is None:
        return id(block)

    def reveal(value: Any) -> Any:
        if hasattr(value, "get_secret_value"):
            secret = value.get_secret_value()
            return _digest(secret if isinstance(secret, str) else secret.hex())
        return str(value)

    payload = json.dumps(dump(), default=reveal, sort_keys=True)
    return f"{type(block).__module__}.{type(block).__qualname__}:{_digest(payload)}"


def _client_cache_key(aws_credentials: Any, max_attempts: int) -> tuple[Any, ...]:
    env = tuple(os.environ.get(name) for name in _CLIENT_ENV_VARS)
    secrets = tuple(_digest(os.environ.get(name)) for name in _CLIENT_SECRET_ENV_VARS)
    block = None if aws_credentials is None else _block_fingerprint(aws_credentials)
    return (block, env, secrets, max_attempts)


def _botocore_config(max_attempts: int) -> Any:
    from botocore.config import Config

    return Config(
        # total_max_attempts counts the first try; botocore's "max_attempts" would count retries.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        max_pool_connections=MAX_POOL_CONNECTIONS,
        # SigV4 everywhere: presigned links (contact sheets, artifacts) must work in every region.
        signature_version="s3v4",
    )


def _build_s3_client(aws_credentials: Any, max_attempts: int) -> S3Client:
    """Build from the standard AWS chain, or from a prefect-aws credentials block when given.

    The block is used through its own `get_boto3_session()` and `aws_client_parameters`, so any
    block with that shape works (AwsCredentials, MinIOCredentials) without importing prefect-aws.
    Its `get_client()` is not used because it cannot take our retry and pool settings.
    """
    import boto3

    config = _botocore_config(max_attempts)
    params: dict[str, Any] = {}
    if aws_credentials is None:
        session = boto3.session.Session()
    else:
        session = aws_credentials.get_boto3_session()
        client_parameters = getattr(aws_credentials, "aws_client_parameters", None)
        if client_parameters is not None:
            params = dict(client_parameters.get_params_override())
        user_config = params.pop("config", None)
        if user_config is not None:
            config = config.merge(user_config)  # the block's own settings win
    if session.region_name is None and os.environ.get("AWS_REGION"):
        # botocore reads only AWS_DEFAULT_REGION; Lambda, ECS and many CI systems set AWS_REGION.
        params.setdefault("region_name", os.environ["AWS_REGION"])
    return session.client("s3", config=config, **params)


def get_s3_client(
    aws_credentials: AwsCredentials | None = None,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> S3Client:
    """The process-wide S3 client for the current configuration.

    boto3 clients are thread-safe but costly to build (~50 ms, their own connection pool), and
    cannot be pickled, so tasks ask for one here instead of receiving one. The cache key covers
    what selects a client (the block's fields, AWS_PROFILE, endpoint, region, access key), so a
    changed environment gets a fresh client instead of a stale one.
    """
    key = _client_cache_key(aws_credentials, max_attempts)
    with _clients_lock:
        cached = _clients.get(key)
        if cached is None:
            cached = (aws_credentials, _build_s3_client(aws_credentials, max_attempts))
            _clients[key] = cached
    return cached[1]


def clear_s3_client_cache() -> None:
    """Forget every cached client, e.g. after rotating credentials in a long-lived worker."""
    with _clients_lock:
        _clients.clear()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_ACCESS_KEY_RE = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA)[A-Z0-9]{12,}\b")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_REGION_CODES = {
    "PermanentRedirect",
    "301",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
}
_RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
}


def _redact(text: str) -> str:
    """Strip anything that looks like an access key, and the configured secret, from a message."""
    text = _ACCESS_KEY_RE.sub("<redacted>", text)
    for name in _CLIENT_SECRET_ENV_VARS:
        secret = os.environ.get(name)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "<redacted>")
    return text


def _s3_uri(bucket: str, key: str | None) -> str:
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def explain_s3_error(exc: Exception, *, bucket: str, key: str | None = None, action: str) -> str:
    """One sentence for a botocore failure: what went wrong, on which bucket/key, what to do.

    Shared with `prompts` so reading a prompt file fails with the same wording as storing images.
    """
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = _s3_uri(bucket, key)
    if isinstance(exc, EndpointConnectionError):
        endpoint = exc.kwargs.get("endpoint_url", "?")
        return (
            f"cannot reach S3 endpoint {endpoint} while trying to {action} {where}: check the "
            "network, AWS_ENDPOINT_URL and the region"
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return (
            f"no usable AWS credentials to {action} {where}: set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or pass an AwsCredentials block"
        )
    if not isinstance(exc, ClientError):
        return _redact(f"could not {action} {where}: {type(exc).__name__}: {exc}")

    error = exc.response.get("Error", {})
    code = str(error.get("Code", "?"))
    message = str(error.get("Message") or "")
    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and key is None):
        return (
            f"bucket '{bucket}' does not exist (wanted to {action} {where}): check the name "
            "or create the bucket"
        )
    if code in ("NoSuchKey", "404", "NotFound"):
        return f"no object at {where} (wanted to {action} it): check the key"
    if code in _DENIED_CODES:
        return (
            f"access denied to bucket '{bucket}' (wanted to {action} {where}): check the IAM "
            "policy and which credentials are in use (AWS_PROFILE, env vars or the "
            "AwsCredentials block)"
        )
    if code in _CREDENTIAL_CODES:
        return _redact(
            f"AWS rejected the credentials ({code}) while trying to {action} {where}: refresh "
            "or fix them (AWS_PROFILE, env vars or the AwsCredentials block)"
        )
    if code in _REGION_CODES:
        region = headers.get("x-amz-bucket-region")
        hint = f"it is in region {region}; " if region else ""
        return (
            f"bucket '{bucket}' is not in the configured region ({code}) while trying to "
            f"{action} {where}: {hint}set AWS_DEFAULT_REGION or the block's region_name"
        )
    return _redact(f"could not {action} {where}: {code}: {message}".rstrip(": "))


def _storage_error(exc: Exception, *, bucket: str, key: str | None, action: str) -> StorageError:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    status: int | None = None
    retryable = isinstance(exc, ConnectionError | HTTPClientError)
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(exc.response.get("Error", {}).get("Code", ""))
        retryable = code in _RETRYABLE_CODES or (status is not None and status >= 500)
    error = StorageError(
        explain_s3_error(exc, bucket=bucket, key=key, action=action), status_code=status
    )
    error.retryable = retryable
    return error


def _boto_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------


class S3Storage:
    """Objects under `s3://bucket/prefix`. Holds settings only; the client comes from the cache."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        aws_credentials: AwsCredentials | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.aws_credentials = aws_credentials
        self.root_uri = _s3_uri(bucket, self.prefix or None)

    def __repr__(self) -> str:
        return f"S3Storage({self.root_uri!r})"

    @property
    def client(self) -> S3Client:
        return get_s3_client(self.aws_credentials)

    def _object_key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def list_keys(self, prefix: str = "") -> set[str]:
        """Every key under root/prefix in one paginated listing: 1 request per 1,000 keys.

        This is how a batch learns what already exists without one HEAD per image.
        """
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        keys: set[str] = set()
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(root) :]
                    if name and not name.endswith("/"):  # skip console "folder" markers
                        keys.add(name)
        except _boto_errors() as exc:
            raise _storage_error(
                exc, bucket=self.bucket, key=root + prefix or None, action="list"
            ) from exc
        return keys

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=object_key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _storage_error(exc, bucket=self.bucket, key=object_key, action="check") from exc
        except _boto_errors() as exc:
            raise _storage_error(exc, bucket=self.bucket, key=object_key, action="check") from exc
        return True

    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Store one object. `metadata` must already be S3-safe: build it with `s3_metadata`."""
        object_key = self._object_key(key)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=object_key,
                Body=data,
                ContentType=content_type,
                Metadata=dict(metadata or {}),
            )
        except _boto_errors() as exc:
            raise _storage_error(exc, bucket=self.bucket, key=object_key, action="upload") from exc
        return f"s3://{self.bucket}/{object_key}"

    def get(self, key: str) -> bytes:
        object_key = self._object_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
            return response["Body"].read()
        except _boto_errors() as exc:
            raise _storage_error(
                exc, bucket=self.bucket, key=object_key, action="download"
            ) from exc

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A GET link for people and browsers without credentials (gallery, artifacts)."""
        object_key = self._object_key(key)
        try:
            return self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": object_key},
                ExpiresIn=expires_s,
            )
        except _boto_errors() as exc:
            raise _storage_error(exc, bucket=self.bucket, key=object_key, action="sign") from exc

    def check_writable(self) -> None:
        """Fail before any money is spent if the bucket is missing, denied or unreachable.

        Uses a client with a single retry: a pre-flight that backs off for half a minute against
        an unreachable endpoint would only delay the same answer.
        """
        client = get_s3_client(self.aws_credentials, max_attempts=2)
        try:
            client.head_bucket(Bucket=self.bucket)
        except _boto_errors() as exc:
            raise _storage_error(exc, bucket=self.bucket, key=None, action="write to") from exc


# --------------------------------------------------------------------------------------------
# Local folder
# --------------------------------------------------------------------------------------------

# Temp files of an in-flight (or killed) `put`: hidden, unique, never listed as keys.
_TEMP_SUFFIX = ".flux-tmp"
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{32}" + re.escape(_TEMP_SUFFIX) + "$")


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file beside the target, fsync, then `os.replace`: a killed process leaves either the
    old file or the new one, never half an image. Leftover temp files end in `_TEMP_SUFFIX`."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def probe_writable(folder: Path) -> None:
    """Create the folder and a probe file: permission bits alone do not prove writability."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-probe.{uuid.uuid4().hex}{_TEMP_SUFFIX}"
    probe.write_bytes(b"")
    probe.unlink()


class LocalStorage:
    """Files under an absolute folder. Metadata is not kept: the manifest holds it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.root_uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.root_uri!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def uri_for(self, key: str) -> str:
        return str(self._path(key))

    def list_keys(self, prefix: str = "") -> set[str]:
        """Walk only the folder the prefix points into, so listing `thumbs/` skips `images/`."""
        directory, _, _ = prefix.rpartition("/")
        folder = self._path(directory) if directory else self.root
        keys: set[str] = set()
        for dirpath, _dirnames, filenames in os.walk(folder):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if _TEMP_RE.match(name):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.add(key)
        return keys

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Write to a temp file beside the target, fsync, then `os.replace`.

        A killed process leaves either the old file or the new one, never half an image; a
        leftover temp file is ignored by `list_keys`. `content_type` and `metadata` are accepted
        for interface parity; the manifest records them.
        """
        path = self._path(key)
        try:
            write_atomically(path, data)
        except OSError as exc:
            raise StorageError(f"could not write {path}: {exc.strerror or exc}") from exc
        return str(path)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"no file at {path}: check the key") from exc
        except OSError as exc:
            raise StorageError(f"could not read {path}: {exc.strerror or exc}") from exc

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return None

    def check_writable(self) -> None:
        """Create the folder and a probe file: permission bits alone do not prove writability."""
        try:
            probe_writable(self.root)
        except OSError as exc:
            raise StorageError(
                f"local folder {self.root} is not writable ({exc.strerror or exc}): choose "
                "another destination or fix its permissions"
            ) from exc


# --------------------------------------------------------------------------------------------
# Destinations
# --------------------------------------------------------------------------------------------

# Permissive on purpose: S3-compatible stores and legacy us-east-1 buckets allow more than the
# modern AWS rules; this only catches obvious mistakes such as spaces or a missing name.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _open_s3(destination: str, aws_credentials: Any) -> S3Storage:
    rest = destination[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
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


# --------------------------------------------------------------------------------------------
# S3 user metadata
# --------------------------------------------------------------------------------------------

S3_METADATA_LIMIT = 2048
_META_PREFIX_LEN = len("x-amz-meta-")
TRUNCATION_MARKER = "...[truncated]"
PROMPT_FIELD = "prompt"
PROMPT_HASH_FIELD = "prompt-sha256"
# Any one other field (a user's id, an error text) may take at most this much, so the prompt
# always keeps most of the 2 KB.
FIELD_VALUE_MAX = 256
# Printable ASCII stays readable; '%' is escaped (so `unquote` reverses exactly), as are control
# characters and everything non-ASCII.
_SAFE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _metadata_key(name: str) -> str:
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


def metadata_size(metadata: Mapping[str, str]) -> int:
    """Bytes S3 counts against its 2 KB limit, plus the header prefix we count to be safe."""
    return sum(
        _META_PREFIX_LEN + len(k.encode("utf-8")) + len(v.encode("utf-8"))
        for k, v in metadata.items()
    )
