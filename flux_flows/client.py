"""FluxClient / AsyncFluxClient: one HTTP call per image, with the retries the API needs.

Both clients share every decision (the request they send, how an answer is parsed, which failures
are retried and for how long) through the module-level helpers; only the I/O loop differs. That
way the sync and async paths cannot drift apart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import io
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

import httpx
from PIL import Image, UnidentifiedImageError
from pydantic import SecretStr

from flux_flows._version import __version__
from flux_flows.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    FluxError,
    InvalidRequestError,
    MissingCredentialsError,
    RateLimitError,
    ResponseError,
    ServerError,
)
from flux_flows.models import FinishReason, GeneratedImage, ImageRequest

logger = logging.getLogger("flux_flows.client")

DEFAULT_BASE_URL = "https://api.fireworks.ai/inference/v1"
API_KEY_ENV = "FIREWORKS_API_KEY"
BASE_URL_ENV = "FIREWORKS_BASE_URL"
ResponseFormat = Literal["image", "json"]

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
_SNIPPET = 200


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, as the official SDK does (0.5 s doubling up to 8 s).

    A server's `Retry-After` wins over the computed delay, capped by `max_retry_after_s` so a
    misbehaving proxy cannot park a pipeline for an hour.
    """

    max_retries: int = 4
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0
    max_retry_after_s: float = 60.0

    def delay(self, retry_index: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number `retry_index` (0-based)."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_retry_after_s)
        ceiling = min(self.initial_delay_s * 2**retry_index, self.max_delay_s)
        # "Equal jitter": never less than half the backoff, so a storm of clients still spreads out
        # without any of them hammering again almost at once.
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def resolve_api_key(api_key: str | SecretStr | None) -> SecretStr:
    """The key from the argument, else the environment; raising before any request is sent."""
    if isinstance(api_key, SecretStr):
        api_key = api_key.get_secret_value()
    key = (api_key or os.environ.get(API_KEY_ENV, "")).strip()
    if not key:
        raise MissingCredentialsError(
            f"No Fireworks API key: set {API_KEY_ENV}, pass api_key=..., or load a "
            "FireworksCredentials block (FireworksCredentials.load('name')). For offline use, "
            "run `flux-flows emulator` and point FIREWORKS_BASE_URL at it."
        )
    return SecretStr(key)


def resolve_base_url(base_url: str | None) -> str:
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
    return url


def endpoint_path(model: str) -> str:
    return f"/workflows/accounts/fireworks/models/{model}/text_to_image"


def accept_header(request: ImageRequest, response_format: ResponseFormat) -> str:
    return "application/json" if response_format == "json" else request.content_type


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date; None if absent."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return float(millis) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def api_error_message(response: httpx.Response) -> str:
    """A readable message from any of the error shapes seen in the wild, else the raw text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        message = message or body.get("message") or body.get("error_message")
        if not message and isinstance(error, str):
            message = error
        if not message and isinstance(body.get("detail"), str):
            message = body["detail"]
    if not message:
        message = response.text.strip()[:_SNIPPET] or response.reason_phrase or "no details"
    return str(message)


def _request_id(response: httpx.Response) -> str | None:
    return response.headers.get("x-request-id") or response.headers.get("fireworks-request-id")


def error_for_status(response: httpx.Response, attempts: int) -> FluxError:
    """Map a non-2xx answer to the exception whose name tells the caller what to do."""
    status = response.status_code
    detail = api_error_message(response)
    rid = _request_id(response)
    after = f" after {attempts} attempts" if attempts > 1 else ""
    if status in (401, 403):
        what = "rejected the API key" if status == 401 else "denied access to this model"
        return AuthenticationError(
            f"Fireworks {what}: {detail}. Check FIREWORKS_API_KEY or your FireworksCredentials "
            "block, and that the key's account can use this model.",
            status_code=status,
            request_id=rid,
        )
    if status in (402, 412):
        return AuthenticationError(
            f"Fireworks refused to bill this account: {detail}. Add a payment method or check "
            "the account's status in the Fireworks console.",
            status_code=status,
            request_id=rid,
        )
    if status == 429:
        return RateLimitError(
            f"Over the account's rate limit{after}: {detail}. Lower max_concurrency or set "
            "requests_per_minute, or wait and re-run (cached images are not paid twice).",
            status_code=status,
            request_id=rid,
            retry_after_s=parse_retry_after(response.headers),
        )
    if status in RETRYABLE_STATUS or status >= 500:
        return ServerError(
            f"Fireworks failed to answer{after}: {detail}. This is usually temporary; re-run "
            "later and only the missing images will be generated.",
            status_code=status,
            request_id=rid,
        )
    if status == 404:
        return InvalidRequestError(
            f"Not found: {detail}. Check the model name and FIREWORKS_BASE_URL.",
            status_code=status,
            request_id=rid,
        )
    return InvalidRequestError(
        f"Fireworks rejected the request: {detail}. Fix the request; retrying it will not help.",
        status_code=status,
        request_id=rid,
    )


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


def sniff_image(data: bytes) -> str:
    """The content type the bytes really are; a complete JPEG or PNG, or ResponseError.

    Checks the trailer too (JPEG EOI marker, PNG IEND chunk), because a truncated image decodes
    to a half-grey picture that would otherwise be stored and paid for as if it were real.
    """
    if data.startswith(_JPEG_MAGIC):
        if b"\xff\xd9" not in data[-64:]:
            raise ResponseError(f"the JPEG answer is truncated ({len(data)} bytes, no end marker)")
        return "image/jpeg"
    if data.startswith(_PNG_MAGIC):
        if not data.rstrip(b"\x00").endswith(_PNG_END):
            raise ResponseError(f"the PNG answer is truncated ({len(data)} bytes, no IEND chunk)")
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    preview = data[:40]
    raise ResponseError(
        f"the answer is not a JPEG or PNG image ({len(data)} bytes starting {preview!r})"
    )


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the header only: no full decode on the hot path."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ResponseError(f"the answer's image cannot be read: {exc}") from exc


def _finish_reason(value: Any) -> FinishReason:
    if value is None or value == "":
        return FinishReason.SUCCESS  # older clients treat a missing reason as success; so do we
    text = str(value).strip().upper()
    if text == FinishReason.SUCCESS:
        return FinishReason.SUCCESS
    if "FILTER" in text or "MODERATED" in text:
        return FinishReason.CONTENT_FILTERED
    raise ResponseError(f"unknown finish reason {str(value)[:40]!r} in the answer")


def _seed(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _decode_base64_image(item: Any) -> bytes:
    if not isinstance(item, str):
        raise ResponseError(
            f"the JSON answer's image is a {type(item).__name__}, not a base64 string"
        )
    payload = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ResponseError(f"the JSON answer's image is not valid base64: {exc}") from exc


def parse_response(
    request: ImageRequest, response: httpx.Response, latency_s: float, attempts: int
) -> GeneratedImage:
    """Turn a 2xx answer, binary or JSON, into a GeneratedImage, or raise ResponseError."""
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    rid = _request_id(response)
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            body = response.json()
        except ValueError as exc:
            raise ResponseError(f"the JSON answer cannot be parsed: {exc}", request_id=rid) from exc
        if not isinstance(body, dict):
            raise ResponseError("the JSON answer is not an object", request_id=rid)
        images = body.get("base64") or body.get("images") or []
        if not isinstance(images, list) or not images:
            raise ResponseError(
                "the JSON answer contains no image (empty 'base64' list)", request_id=rid
            )
        data = _decode_base64_image(images[0])
        finish = _finish_reason(body.get("finishReason", body.get("finish_reason")))
        seed = _seed(body.get("seed"))
        rid = rid or (str(body["id"]) if body.get("id") else None)
    elif content_type.startswith("image/") or content_type in ("", "application/octet-stream"):
        data = response.content
        finish = _finish_reason(response.headers.get("finish-reason"))
        seed = _seed(response.headers.get("seed"))
    else:
        snippet = response.text[:_SNIPPET].strip()
        raise ResponseError(
            f"expected an image or JSON, got {content_type or 'no content type'}: {snippet!r}",
            status_code=response.status_code,
            request_id=rid,
        )
    real_type = sniff_image(data)
    width, height = image_size(data)
    return GeneratedImage(
        request=request,
        data=data,
        content_type=real_type,
        seed=seed,
        finish_reason=finish,
        request_id=rid,
        latency_s=latency_s,
        width=width,
        height=height,
        attempts=attempts,
    )


def _transport_error(exc: httpx.TransportError, attempts: int) -> APIConnectionError:
    after = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(
            f"No answer from Fireworks in time{after} ({type(exc).__name__}). Raise the timeout "
            "or lower the concurrency."
        )
    return APIConnectionError(
        f"Network error talking to Fireworks{after}: {type(exc).__name__}: {exc}. Check "
        "connectivity and FIREWORKS_BASE_URL."
    )


RetryHook = Callable[[int, float, str], None]


class _ClientBase:
    """Configuration and the retry decision shared by both clients."""

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        response_format: ResponseFormat = "image",
        max_connections: int = 64,
        on_retry: RetryHook | None = None,
    ) -> None:
        if response_format not in ("image", "json"):
            raise ValueError(f"response_format must be 'image' or 'json', got {response_format!r}")
        self._api_key = resolve_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.retry = retry or RetryPolicy()
        self.response_format: ResponseFormat = response_format
        self.limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self.on_retry = on_retry

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "User-Agent": f"flux-flows/{__version__}",
        }

    def _redact(self, error: FluxError) -> FluxError:
        """A server that echoes the key must not make us print it."""
        secret = self._api_key.get_secret_value()
        # Very short "keys" (the emulator takes any) would mangle ordinary words if replaced.
        if len(secret) >= 8 and secret in error.message:
            error.message = error.message.replace(secret, "***")
            error.args = (error.message,)
        return error

    def _retry_delay(self, retry_index: int, error: FluxError) -> float | None:
        """Seconds to wait before retrying, or None when this failure must not be retried."""
        if not error.retryable or retry_index >= self.retry.max_retries:
            return None
        after = error.retry_after_s if isinstance(error, RateLimitError) else None
        return self.retry.delay(retry_index, after)

    def _note_retry(self, attempt: int, delay: float, error: FluxError) -> None:
        logger.info(
            "retrying in %.2fs (attempt %d of %d): %s",
            delay,
            attempt + 1,
            self.retry.max_retries + 1,
            error,
        )
        if self.on_retry is not None:
            self.on_retry(attempt, delay, type(error).__name__)

    def _outcome(
        self, request: ImageRequest, response: httpx.Response, started: float, attempts: int
    ) -> GeneratedImage | FluxError:
        if response.is_success:
            try:
                return parse_response(request, response, time.perf_counter() - started, attempts)
            except ResponseError as exc:
                return self._redact(exc)
        return self._redact(error_for_status(response, attempts))


class FluxClient(_ClientBase):
    """Synchronous client; thread-safe, one pooled connection set per instance.

    >>> with FluxClient() as client:  # FIREWORKS_API_KEY from the environment
    ...     image = client.generate(ImageRequest(prompt="a red fox in snow", seed=7))
    """

    def __init__(self, api_key: str | SecretStr | None = None, **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=self.timeout,
            limits=self.limits,
            headers=self._headers(),
        )

    def generate(self, request: ImageRequest) -> GeneratedImage:
        """Generate one image, retrying what is worth retrying; raises a FluxError subclass."""
        headers = {"Accept": accept_header(request, self.response_format)}
        path = endpoint_path(request.model)
        attempt = throttled = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                response = self._http.post(path, json=request.api_body(), headers=headers)
                outcome = self._outcome(request, response, started, attempt)
            except httpx.TransportError as exc:
                outcome = _transport_error(exc, attempt)
            if isinstance(outcome, GeneratedImage):
                return outcome.model_copy(update={"throttled": throttled}) if throttled else outcome
            throttled += isinstance(outcome, RateLimitError)
            delay = self._retry_delay(attempt - 1, outcome)
            if delay is None:
                outcome.attempts, outcome.throttled = attempt, throttled
                raise outcome
            self._note_retry(attempt, delay, outcome)
            time.sleep(delay)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncFluxClient(_ClientBase):
    """Asynchronous twin of FluxClient for asyncio code; same requests, parsing and retries.

    >>> async with AsyncFluxClient() as client:
    ...     image = await client.generate(ImageRequest(prompt="a red fox in snow", seed=7))
    """

    def __init__(self, api_key: str | SecretStr | None = None, **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self.timeout,
            limits=self.limits,
            headers=self._headers(),
        )

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        """Generate one image, retrying what is worth retrying; raises a FluxError subclass."""
        headers = {"Accept": accept_header(request, self.response_format)}
        path = endpoint_path(request.model)
        attempt = throttled = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                response = await self._http.post(path, json=request.api_body(), headers=headers)
                outcome = self._outcome(request, response, started, attempt)
            except httpx.TransportError as exc:
                outcome = _transport_error(exc, attempt)
            if isinstance(outcome, GeneratedImage):
                return outcome.model_copy(update={"throttled": throttled}) if throttled else outcome
            throttled += isinstance(outcome, RateLimitError)
            delay = self._retry_delay(attempt - 1, outcome)
            if delay is None:
                outcome.attempts, outcome.throttled = attempt, throttled
                raise outcome
            self._note_retry(attempt, delay, outcome)
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
