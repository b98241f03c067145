"""S3: the process-wide boto3 client, one sentence for every botocore failure, and S3Storage.

Storage objects hold only settings (bucket, prefix, credentials block), never a client, so they
can be pickled into tasks and Dask workers; each process builds its S3 client once and reuses it
(`get_s3_client`). Every failure becomes a `StorageError` whose message names the bucket or key
and says what to do, because a raw botocore traceback in a 10,000-image run helps nobody.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flux_flows.errors import StorageError
from flux_flows.storage.base import Metadata, ReadError, TooLargeError, check_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from prefect_aws import AwsCredentials

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "EXPECT_CONTINUE_MIN_BYTES",
    "MAX_POOL_CONNECTIONS",
    "S3Storage",
    "clear_s3_client_cache",
    "explain_s3_error",
    "get_s3_client",
    "iter_object_keys",
    "read_object",
]

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
# botocore sends `Expect: 100-continue` with every PutObject, then waits for the server's
# interim answer before sending the body: one more round trip and ~0.2 ms of CPU per put, to
# avoid uploading a body the server would refuse. Below this size, sending it anyway is cheaper
# (an image is ~0.1-2 MB, its thumbnail ~10 KB). The AWS SDK for Go v2 has the same 2 MB
# default (`ContinueHeaderThresholdBytes`).
EXPECT_CONTINUE_MIN_BYTES = 2 * 1024 * 1024

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
    """Retries, pool and signature; body checksums and payload signing stay botocore's own.

    Measured for issue 17 (benchmarks/RESULTS.md) and left alone on purpose. With
    `request_checksum_calculation="when_required"` there is no CRC32 for S3 to check the body
    against (saves 0.07 ms per 300 KB image), but over HTTPS that CRC32 is what lets botocore
    skip the payload's SHA-256, so real S3 would then hash every body (0.18 ms) instead.
    `payload_signing_enabled=False` saves the SHA-256 only on plain-HTTP endpoints (MinIO,
    moto), where it is the body's only protection in transit. The rest of a put, ~0.9 ms, is
    botocore's own per-call work, which no setting removes.
    """
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
    client = session.client("s3", config=config, **params)
    client.meta.events.register(
        "request-created.s3.PutObject",
        _skip_expect_continue_for_small_bodies,
        unique_id="flux-flows-expect-continue",
    )
    return client


def _skip_expect_continue_for_small_bodies(request: Any, **_: Any) -> None:
    """Drop `Expect: 100-continue` from a put whose body is under EXPECT_CONTINUE_MIN_BYTES.

    Runs on every attempt, after botocore has added the header (it is not signed, so removing
    it leaves the signature valid). A body of unknown size keeps it.
    """
    from botocore.utils import determine_content_length

    if "Expect" not in request.headers:
        return
    # Over HTTPS the body is wrapped for its CRC32 trailer; the header has the real size.
    decoded = request.headers.get("X-Amz-Decoded-Content-Length")
    size = int(decoded) if decoded else determine_content_length(request.body)
    if size is not None and size < EXPECT_CONTINUE_MIN_BYTES:
        del request.headers["Expect"]


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

    Every S3 call in the package is worded here, so reading a prompt file fails with the same
    words as storing an image.
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


def _storage_error(
    exc: Exception,
    *,
    bucket: str,
    key: str | None,
    action: str,
    error_type: type[StorageError] = StorageError,
) -> StorageError:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    status: int | None = None
    retryable = isinstance(exc, ConnectionError | HTTPClientError)
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(exc.response.get("Error", {}).get("Code", ""))
        retryable = code in _RETRYABLE_CODES or (status is not None and status >= 500)
    error = error_type(
        explain_s3_error(exc, bucket=bucket, key=key, action=action), status_code=status
    )
    error.retryable = retryable
    return error


def _boto_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


# --------------------------------------------------------------------------------------------
# Reading and listing, for S3Storage and for `read_uri`/`list_uri`
# --------------------------------------------------------------------------------------------


def read_object(
    bucket: str,
    key: str,
    *,
    aws_credentials: AwsCredentials | None = None,
    max_bytes: int | None = None,
    action: str = "download",
) -> bytes:
    """One object's bytes; over `max_bytes` it is refused from its size, before the download."""
    try:
        response = get_s3_client(aws_credentials).get_object(Bucket=bucket, Key=key)
        size = int(response.get("ContentLength") or 0)
        if max_bytes is not None and size > max_bytes:
            response["Body"].close()
            raise TooLargeError(
                f"{_s3_uri(bucket, key)} is {size} bytes, over the limit of {max_bytes}", size=size
            )
        return response["Body"].read()
    except _boto_errors() as exc:
        raise _storage_error(
            exc, bucket=bucket, key=key, action=action, error_type=ReadError
        ) from exc


def iter_object_keys(
    bucket: str, prefix: str = "", *, aws_credentials: AwsCredentials | None = None
) -> Iterator[str]:
    """Every key under the prefix, "folder" markers too, in one paginated listing.

    One request per 1,000 keys: this is how a batch learns what already exists without one HEAD
    per image.
    """
    paginator = get_s3_client(aws_credentials).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]
    except _boto_errors() as exc:
        raise _storage_error(
            exc, bucket=bucket, key=prefix or None, action="list", error_type=ReadError
        ) from exc


# --------------------------------------------------------------------------------------------
# S3Storage
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
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def list_keys(self, prefix: str = "") -> set[str]:
        """One listing tells a batch what is already stored; "folder" markers are not images."""
        root = f"{self.prefix}/" if self.prefix else ""
        listing = iter_object_keys(self.bucket, root + prefix, aws_credentials=self.aws_credentials)
        names = (object_key[len(root) :] for object_key in listing)
        return {name for name in names if name and not name.endswith("/")}

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

    def put(self, key: str, data: bytes, *, content_type: str, metadata: Metadata = None) -> str:
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
        return read_object(self.bucket, self._object_key(key), aws_credentials=self.aws_credentials)

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
