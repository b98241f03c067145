"""S3: the process-wide boto3 client, one sentence for every botocore failure, and S3Storage.

Storage objects hold only settings (bucket, prefix, credentials block), never a client, so they
can be pickled into tasks and Dask workers; each process builds its S3 client once and reuses it
(`get_s3_client`). Every failure becomes a `StorageError` whose message names the bucket or key
and says what to do, because a raw botocore traceback in a 10,000-image run helps nobody.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux_flows.errors import StorageError
from flux_flows.storage.base import Metadata, ReadError, TooLargeError, check_key
from flux_flows.storage.s3_client import (
    _CLIENT_SECRET_ENV_VARS,
    DEFAULT_MAX_ATTEMPTS,
    EXPECT_CONTINUE_MIN_BYTES,
    MAX_POOL_CONNECTIONS,
    clear_s3_client_cache,
    get_s3_client,
)

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


def iter_object_lines(
    bucket: str, key: str, *, aws_credentials: AwsCredentials | None = None, keepends: bool = False
) -> Iterator[bytes]:
    """One object's lines, streamed from the response body."""
    try:
        body = get_s3_client(aws_credentials).get_object(Bucket=bucket, Key=key)["Body"]
        yield from body.iter_lines(keepends=keepends)
    except _boto_errors() as exc:
        raise _storage_error(
            exc, bucket=bucket, key=key, action="read", error_type=ReadError
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


def _lost_race(exc: Exception) -> bool:
    """A conditional PUT refused because the object exists (412) or is being written (409)."""
    response = getattr(exc, "response", {})
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


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
        self._put_object(key, data, content_type=content_type, Metadata=dict(metadata or {}))
        return self.uri_for(key)

    def _put_object(self, key: str, data: bytes, *, content_type: str, **conditions: Any) -> bool:
        """One PutObject with extra arguments (`Metadata`, `IfNoneMatch`...): False only when its
        `IfNoneMatch` refused it, StorageError for any other failure."""
        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=object_key,
                Body=data,
                ContentType=content_type,
                **conditions,
            )
        except ClientError as exc:
            if "IfNoneMatch" in conditions and _lost_race(exc):
                return False
            raise _storage_error(exc, bucket=self.bucket, key=object_key, action="upload") from exc
        except _boto_errors() as exc:
            raise _storage_error(exc, bucket=self.bucket, key=object_key, action="upload") from exc
        return True

    def put_file(self, key: str, path: Path, *, content_type: str) -> str:
        """Upload a file of any size without reading it into memory (multipart when large)."""
        object_key = self._object_key(key)
        from boto3.exceptions import S3UploadFailedError

        try:
            self.client.upload_file(
                str(path), self.bucket, object_key, ExtraArgs={"ContentType": content_type}
            )
        except (*_boto_errors(), S3UploadFailedError, OSError) as exc:
            # The transfer manager wraps the service's error; explain the service's own.
            cause = exc.__cause__ if isinstance(exc, S3UploadFailedError) else exc
            error = cause if isinstance(cause, Exception) else exc
            raise _storage_error(
                error, bucket=self.bucket, key=object_key, action="upload"
            ) from exc
        return f"s3://{self.bucket}/{object_key}"

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return read_object(
            self.bucket,
            self._object_key(key),
            aws_credentials=self.aws_credentials,
            max_bytes=max_bytes,
        )

    def create(self, key: str, data: bytes, *, content_type: str) -> bool:
        """PUT with `If-None-Match: *`: True if this call created `key`, False if it existed.

        S3 decides atomically which of two racing writers wins (412 for the loser; 409 when the
        two overlap in flight, which also means "someone else is writing it").
        """
        return self._put_object(key, data, content_type=content_type, IfNoneMatch="*")

    def age_s(self, key: str) -> float | None:
        """Seconds since `key` was last written, by S3's own clock: its `Last-Modified` against
        the `Date` of the same answer (one clock, whatever this machine's says). None: absent."""
        from email.utils import parsedate_to_datetime

        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=object_key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _storage_error(exc, bucket=self.bucket, key=object_key, action="check") from exc
        except _boto_errors() as exc:
            raise _storage_error(exc, bucket=self.bucket, key=object_key, action="check") from exc
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            raise StorageError(f"S3 answered no Date header for {self.uri_for(key)}")
        now = parsedate_to_datetime(date)
        return max(0.0, (now - head["LastModified"]).total_seconds())

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=object_key)
        except _boto_errors() as exc:
            raise _storage_error(exc, bucket=self.bucket, key=object_key, action="delete") from exc

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
