"""FluxClient / AsyncFluxClient: one HTTP call per image, with the retries the API needs.

Both clients share every decision (the request they send, how an answer is parsed, which failures
are retried and for how long) through the module-level helpers; only the I/O loop differs. That
way the sync and async paths cannot drift apart.

FLUX.1 models answer one text_to_image call with the image. FLUX Kontext models are asynchronous:
submit, poll `get_result` until the task is Ready (or moderated, or failed), then download the
result's `sample` URL promptly (it expires). `generate` hides the difference: both return a
`GeneratedImage`. The Kontext decisions (what a poll answer means, how long to wait, whether the
download may carry the API key) live in `KontextTask` and module-level helpers; the two clients
only differ in how they sleep and send.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import io
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urljoin, urlsplit

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
from flux_flows.images_in import (
    InputImageError,
    describe_reference,
    resolve_input_image,
    sha256_hex,
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


# --------------------------------------------------------------------------------------------
# FLUX Kontext: submit, poll get_result, download the sample
# --------------------------------------------------------------------------------------------

T = TypeVar("T")
_KONTEXT_STATUSES = {
    status.lower(): status
    for status in (
        "Task not found",
        "Pending",
        "Request Moderated",
        "Content Moderated",
        "Ready",
        "Error",
    )
}


@dataclass(frozen=True)
class KontextPolicy:
    """How a Kontext task is waited for: polls from 0.5 s apart backing off to 2 s, for 2 min.

    Those are the figures working clients use. An early `Task not found` is tolerated, because a
    task may not be visible to get_result the instant submit answers: it means the task is lost
    only once `not_found_grace_s` have passed since submit *and* at least `not_found_min_polls`
    polls said so (a process paused past the grace period still asks a few times).
    """

    poll_initial_s: float = 0.5
    poll_max_s: float = 2.0
    poll_backoff: float = 1.5
    timeout_s: float = 120.0
    not_found_grace_s: float = 10.0
    not_found_min_polls: int = 3

    def __post_init__(self) -> None:
        if self.poll_initial_s <= 0 or self.poll_max_s < self.poll_initial_s:
            raise ValueError("need 0 < poll_initial_s <= poll_max_s")
        if self.poll_backoff < 1:
            raise ValueError("poll_backoff must be >= 1")
        if self.timeout_s <= 0 or self.not_found_grace_s < 0 or self.not_found_min_polls < 1:
            raise ValueError(
                "need timeout_s > 0, not_found_grace_s >= 0 and not_found_min_polls >= 1"
            )

    def delay(self, polls_done: int) -> float:
        return min(self.poll_initial_s * self.poll_backoff**polls_done, self.poll_max_s)


def kontext_submit_path(model: str) -> str:
    return f"/workflows/accounts/fireworks/models/{model}"


def kontext_result_path(model: str) -> str:
    return f"{kontext_submit_path(model)}/get_result"


def kontext_input_data_uri(request: ImageRequest, aws_credentials: Any = None) -> str | None:
    """The edit's image as a data URI, read at send time and checked against the request's hash.

    Reading here rather than storing bytes in the request keeps memory flat in big batches. If
    the file changed since its hash was taken, sending it would store a different picture under
    the old cache key, so that is refused.
    """
    if request.input_image is None:
        return None
    try:
        data, mime = resolve_input_image(request.input_image, aws_credentials)
    except InputImageError as exc:
        raise InvalidRequestError(f"cannot send the input image: {exc}") from exc
    expected = request.input_image_sha256
    if expected and sha256_hex(data) != expected:
        raise InvalidRequestError(
            f"input image {describe_reference(request.input_image)} changed since the request was "
            "made (its SHA-256 no longer matches); nothing was sent. Re-run to use the new image."
        )
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _json_body(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        snippet = response.text[:_SNIPPET].strip()
        raise ResponseError(f"the {what} answer is not JSON: {snippet!r}") from exc
    if not isinstance(body, dict):
        raise ResponseError(f"the {what} answer is not a JSON object")
    return body


def parse_submit(response: httpx.Response) -> str:
    """The task id from a Kontext submit answer, `{"request_id": ...}` (or `id`, liberally)."""
    body = _json_body(response, "Kontext submit")
    request_id = body.get("request_id") or body.get("id")
    if not isinstance(request_id, str) or not request_id.strip():
        raise ResponseError(
            "the Kontext submit answer has no request_id; nothing to poll",
            request_id=_request_id(response),
        )
    return request_id.strip()


@dataclass(frozen=True)
class PollAnswer:
    """One get_result answer: `status` normalised to the contract's spelling."""

    status: str
    result: dict[str, Any] | None
    details: Any = None
    progress: Any = None


def parse_poll(response: httpx.Response) -> PollAnswer:
    """A get_result answer; a malformed one is retryable, since polling again costs nothing."""
    try:
        body = _json_body(response, "Kontext get_result")
        status = body.get("status")
        if not isinstance(status, str):
            raise ResponseError(f"the Kontext get_result answer has no status: {body!r:.200}")
    except ResponseError as exc:
        exc.retryable = True
        raise
    result = body.get("result")
    return PollAnswer(
        status=_KONTEXT_STATUSES.get(status.strip().lower(), status.strip()),
        result=result if isinstance(result, dict) else None,
        details=body.get("details"),
        progress=body.get("progress"),
    )


def _describe(details: Any) -> str:
    if details is None or details == "" or details == {}:
        return "no details given"
    text = details if isinstance(details, str) else json.dumps(details, default=str)
    return text[:_SNIPPET]


def same_origin(url: str, base_url: str) -> bool:
    """Whether `url` is on the API's own origin (scheme, host, port): only then may it see the key.

    Result URLs usually point at a storage host; sending it the API key would hand the key to
    whoever runs that host. Comparing the whole origin is stricter than comparing host names.
    """
    a, b = urlsplit(url), urlsplit(base_url)
    return (a.scheme.lower(), a.hostname, a.port or _default_port(a.scheme)) == (
        b.scheme.lower(),
        b.hostname,
        b.port or _default_port(b.scheme),
    )


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443}.get(scheme.lower())


def _redact_url(url: str) -> str:
    """Scheme, host and path only: a signed URL's query string is a credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def build_download(
    http: httpx.Client | httpx.AsyncClient, url: str, base_url: str
) -> httpx.Request:
    """A plain GET for a result URL, carrying Authorization only on the API's own origin."""
    request = http.build_request("GET", url, headers={"Accept": "image/*"})
    if not same_origin(url, base_url):
        request.headers.pop("Authorization", None)
    return request


def parse_download(response: httpx.Response) -> bytes:
    """The image bytes of a result; a truncated or non-image body is retried (a re-download is free)."""
    try:
        sniff_image(response.content)
    except ResponseError as exc:
        exc.retryable = True
        raise
    return response.content


def download_error(response: httpx.Response, url: str, attempts: int) -> FluxError:
    """A failed result download: 408/429/5xx are retried; 403/404/410 usually mean it expired."""
    status = response.status_code
    where = _redact_url(url)
    after = f" after {attempts} attempts" if attempts > 1 else ""
    if status == 429:
        return RateLimitError(
            f"downloading the Kontext result {where} was rate limited{after}",
            status_code=status,
            retry_after_s=parse_retry_after(response.headers),
        )
    if status in RETRYABLE_STATUS or status >= 500:
        return ServerError(
            f"downloading the Kontext result {where} failed{after}: {api_error_message(response)}",
            status_code=status,
        )
    return ResponseError(
        f"the Kontext result {where} could not be downloaded: {api_error_message(response)}. "
        "Result URLs expire soon after the task is ready; re-run to generate it again.",
        status_code=status,
    )


@dataclass(frozen=True)
class KontextReady:
    url: str
    seed: int | None


@dataclass(frozen=True)
class KontextModerated:
    status: str
    details: Any


@dataclass
class KontextTask:
    """What the client knows about one submitted Kontext task, and what each poll answer means.

    Pure decisions only (no I/O), shared by both clients: how long to wait before the next poll,
    and whether an answer means "keep polling", "download this", "moderated" or an error.
    """

    request: ImageRequest
    request_id: str
    policy: KontextPolicy
    base_url: str
    started: float = field(default_factory=time.monotonic)
    polls: int = 0
    not_found: int = 0
    last_status: str = "submitted"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def next_delay(self) -> float:
        """Seconds to wait before the next poll; raises APITimeoutError once the time is up."""
        remaining = self.policy.timeout_s - self.elapsed()
        if remaining <= 0:
            error = APITimeoutError(
                f"Kontext task {self.request_id} was not finished after "
                f"{self.policy.timeout_s:g} s (last status: {self.last_status}, {self.polls} "
                "polls). Nothing was stored; raise KontextPolicy.timeout_s or re-run later.",
                request_id=self.request_id,
            )
            error.retryable = False  # a re-submit would pay again for the same image
            raise error
        return min(self.policy.delay(self.polls), remaining)

    def advance(self, answer: PollAnswer) -> KontextReady | KontextModerated | None:
        """Digest one poll answer: None means poll again."""
        self.polls += 1
        self.last_status = answer.status
        status = answer.status
        if status == "Pending":
            return None
        if status == "Task not found":
            self.not_found += 1
            early = self.elapsed() <= self.policy.not_found_grace_s
            if early or self.not_found < self.policy.not_found_min_polls:
                return None  # early "not found" is transient: the task is not visible yet
            raise ResponseError(
                f"Fireworks lost Kontext task {self.request_id}: get_result still answers "
                f"'Task not found' {self.elapsed():.1f} s after submit ({self.not_found} "
                "polls). Re-run to submit it again.",
                request_id=self.request_id,
            )
        if status in ("Request Moderated", "Content Moderated"):
            return KontextModerated(status, answer.details)
        if status == "Ready":
            return self._ready(answer)
        if status == "Error":
            error = ServerError(
                f"Fireworks reported an error for Kontext task {self.request_id}: "
                f"{_describe(answer.details)}. Nothing was generated; re-run to try again.",
                request_id=self.request_id,
            )
            error.retryable = False  # the task itself failed: report it, do not loop on it
            raise error
        raise ResponseError(
            f"Kontext task {self.request_id} has an unknown status {status[:40]!r} (expected "
            f"one of {', '.join(_KONTEXT_STATUSES.values())})",
            request_id=self.request_id,
        )

    def _ready(self, answer: PollAnswer) -> KontextReady:
        result = answer.result or {}
        sample = result.get("sample")
        if not isinstance(sample, str) or not sample.strip():
            raise ResponseError(
                f"Kontext task {self.request_id} is Ready but its result has no sample URL",
                request_id=self.request_id,
            )
        url = urljoin(self.base_url + "/", sample.strip())
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise ResponseError(
                f"Kontext task {self.request_id}: the sample is not an http(s) URL",
                request_id=self.request_id,
            )
        return KontextReady(url, _seed(result.get("seed")))

    def image(
        self, data: bytes, seed: int | None, tally: _Tally, latency_s: float
    ) -> GeneratedImage:
        width, height = image_size(data)
        return GeneratedImage(
            request=self.request,
            data=data,
            content_type=sniff_image(data),
            seed=seed if seed is not None else self.request.seed,
            finish_reason=FinishReason.SUCCESS,
            request_id=self.request_id,
            latency_s=latency_s,
            width=width,
            height=height,
            attempts=tally.attempts,
            throttled=tally.throttled,
        )

    def moderated(
        self, outcome: KontextModerated, tally: _Tally, latency_s: float
    ) -> GeneratedImage:
        """No image at all (see GeneratedImage): recorded as CONTENT_FILTERED, never as real."""
        logger.info(
            "Kontext task %s: %s (%s)", self.request_id, outcome.status, _describe(outcome.details)
        )
        return GeneratedImage(
            request=self.request,
            data=b"",
            content_type=self.request.content_type,
            seed=self.request.seed,
            finish_reason=FinishReason.CONTENT_FILTERED,
            request_id=self.request_id,
            latency_s=latency_s,
            width=0,
            height=0,
            attempts=tally.attempts,
            throttled=tally.throttled,
        )


@dataclass
class _Tally:
    """HTTP requests one generation took (all retries, polls and downloads), and 429s among them."""

    attempts: int = 0
    throttled: int = 0


RetryHook = Callable[[int, float, str], None]
StatusMapper = Callable[[httpx.Response, int], FluxError]


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
        kontext: KontextPolicy | None = None,
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
        self.kontext = kontext or KontextPolicy()

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

    def _wait_or_raise(self, tally: _Tally, retry_index: int, error: FluxError) -> float:
        """Seconds before retrying one call of a Kontext task, or raise the error with the tally."""
        tally.throttled += isinstance(error, RateLimitError)
        delay = self._retry_delay(retry_index, error)
        if delay is None:
            raise error
        self._note_retry(retry_index + 1, delay, error)
        return delay

    def _settle(
        self,
        attempt: int,
        response: httpx.Response,
        parse: Callable[[httpx.Response], T],
        on_status: StatusMapper,
    ) -> T | FluxError:
        """One answer of a Kontext call: parsed value, or the FluxError it amounts to (redacted)."""
        try:
            if response.is_success:
                return parse(response)
            return self._redact(on_status(response, attempt))
        except FluxError as exc:
            return self._redact(exc)

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

    def generate(self, request: ImageRequest, *, aws_credentials: Any = None) -> GeneratedImage:
        """Generate one image, retrying what is worth retrying; raises a FluxError subclass.

        Kontext models are submitted, polled and downloaded (see `KontextPolicy`); a moderated
        task comes back as CONTENT_FILTERED with no bytes. `aws_credentials` (a prefect-aws
        block) reads an `s3://` input image; without it the standard AWS configuration is used.
        """
        if request.is_kontext:
            return self._generate_kontext(request, aws_credentials)
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

    def _call(
        self,
        tally: _Tally,
        send: Callable[[], httpx.Response],
        parse: Callable[[httpx.Response], T],
        on_status: StatusMapper = error_for_status,
    ) -> T:
        """One HTTP exchange of a Kontext task, retried per the RetryPolicy."""
        retry_index = 0
        while True:
            tally.attempts += 1
            try:
                outcome = self._settle(retry_index + 1, send(), parse, on_status)
            except httpx.TransportError as exc:
                outcome = _transport_error(exc, retry_index + 1)
            if not isinstance(outcome, FluxError):
                return outcome
            time.sleep(self._wait_or_raise(tally, retry_index, outcome))
            retry_index += 1

    def _submit_kontext(self, tally: _Tally, request: ImageRequest, aws_credentials: Any) -> str:
        """Read the input image (if any), submit, return the task id; the body dies here."""
        body = request.api_body(input_data_uri=kontext_input_data_uri(request, aws_credentials))
        path = kontext_submit_path(request.model)
        return self._call(tally, lambda: self._http.post(path, json=body), parse_submit)

    def _generate_kontext(self, request: ImageRequest, aws_credentials: Any) -> GeneratedImage:
        started, tally = time.perf_counter(), _Tally()
        try:
            request_id = self._submit_kontext(tally, request, aws_credentials)
            task = KontextTask(request, request_id, self.kontext, self.base_url)
            path, poll = kontext_result_path(request.model), {"id": request_id}
            outcome: KontextReady | KontextModerated | None = None
            while outcome is None:
                time.sleep(task.next_delay())
                answer = self._call(tally, lambda: self._http.post(path, json=poll), parse_poll)
                outcome = task.advance(answer)
            if isinstance(outcome, KontextModerated):
                return task.moderated(outcome, tally, time.perf_counter() - started)
            url = outcome.url
            data = self._call(
                tally,
                lambda: self._http.send(
                    build_download(self._http, url, self.base_url), follow_redirects=True
                ),
                parse_download,
                lambda response, attempt: download_error(response, url, attempt),
            )
            return task.image(data, outcome.seed, tally, time.perf_counter() - started)
        except FluxError as exc:
            exc.attempts, exc.throttled = tally.attempts, tally.throttled
            raise

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

    async def generate(
        self, request: ImageRequest, *, aws_credentials: Any = None
    ) -> GeneratedImage:
        """Generate one image, retrying what is worth retrying; raises a FluxError subclass.

        Same behaviour as `FluxClient.generate`, Kontext included; the input image is read in
        a worker thread so the event loop never blocks on a file or S3.
        """
        if request.is_kontext:
            return await self._generate_kontext(request, aws_credentials)
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

    async def _call(
        self,
        tally: _Tally,
        send: Callable[[], Awaitable[httpx.Response]],
        parse: Callable[[httpx.Response], T],
        on_status: StatusMapper = error_for_status,
    ) -> T:
        """One HTTP exchange of a Kontext task, retried per the RetryPolicy."""
        retry_index = 0
        while True:
            tally.attempts += 1
            try:
                outcome = self._settle(retry_index + 1, await send(), parse, on_status)
            except httpx.TransportError as exc:
                outcome = _transport_error(exc, retry_index + 1)
            if not isinstance(outcome, FluxError):
                return outcome
            await asyncio.sleep(self._wait_or_raise(tally, retry_index, outcome))
            retry_index += 1

    async def _submit_kontext(
        self, tally: _Tally, request: ImageRequest, aws_credentials: Any
    ) -> str:
        """Read the input image (if any) off the loop, submit, return the task id."""
        data_uri = (
            await asyncio.to_thread(kontext_input_data_uri, request, aws_credentials)
            if request.input_image is not None
            else None
        )
        body = request.api_body(input_data_uri=data_uri)
        path = kontext_submit_path(request.model)
        return await self._call(tally, lambda: self._http.post(path, json=body), parse_submit)

    async def _generate_kontext(
        self, request: ImageRequest, aws_credentials: Any
    ) -> GeneratedImage:
        started, tally = time.perf_counter(), _Tally()
        try:
            request_id = await self._submit_kontext(tally, request, aws_credentials)
            task = KontextTask(request, request_id, self.kontext, self.base_url)
            path, poll = kontext_result_path(request.model), {"id": request_id}
            outcome: KontextReady | KontextModerated | None = None
            while outcome is None:
                await asyncio.sleep(task.next_delay())
                answer = await self._call(
                    tally, lambda: self._http.post(path, json=poll), parse_poll
                )
                outcome = task.advance(answer)
            if isinstance(outcome, KontextModerated):
                return task.moderated(outcome, tally, time.perf_counter() - started)
            url = outcome.url
            data = await self._call(
                tally,
                lambda: self._http.send(
                    build_download(self._http, url, self.base_url), follow_redirects=True
                ),
                parse_download,
                lambda response, attempt: download_error(response, url, attempt),
            )
            return task.image(data, outcome.seed, tally, time.perf_counter() - started)
        except FluxError as exc:
            exc.attempts, exc.throttled = tally.attempts, tally.throttled
            raise

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
