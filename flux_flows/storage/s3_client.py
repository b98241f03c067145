"""The boto3 S3 client, one per process and configuration: built once, reused by every thread.

Separate from `s3.py` (the storage itself) because its job is different: honour the standard AWS
configuration (env, profiles, `AWS_ENDPOINT_URL`, a prefect-aws block) and keep a pool sized for
a batch's concurrency, without ever putting a secret in a cache key anyone can read.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from prefect_aws import AwsCredentials


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
# interim answer before sending the body: one more round trip and 0.1-0.2 ms of CPU per put (an
# uncommitted A/B of issue 17, marked as such in benchmarks/RESULTS.md), to
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

    Measured for issue 17 with in-process A/B loops that were never committed (benchmarks/
    RESULTS.md marks the figures as a scratch experiment) and left alone on purpose. With
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
