"""The wire format, and nothing else: what goes out, what an answer means, which error it is.

No I/O here (latency is measured by the caller), so the one protocol loop in
`_protocol` and every test can use these functions on hand-made `httpx.Response`s. Requests are
built with the pooled client's `build_request`, so the client's defaults (the key, the user
agent, timeouts) ride along exactly as they would with `client.post`.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from flux_flows.errors import (
    AuthenticationError,
    FluxError,
    InvalidRequestError,
    RateLimitError,
    ResponseError,
    ServerError,
)
from flux_flows.inputs.sniff import image_size, sniff_image
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.results import GeneratedImage

ResponseFormat = Literal["image", "json"]
# `httpx.Client.build_request` / `httpx.AsyncClient.build_request`: the same in both modes.
RequestBuilder = Callable[..., httpx.Request]

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
_SNIPPET = 200

# --- Requests ---


def endpoint_path(model: str) -> str:
    return f"/workflows/accounts/fireworks/models/{model}/text_to_image"


def accept_header(request: ImageRequest, response_format: ResponseFormat) -> str:
    return "application/json" if response_format == "json" else request.content_type


def text_to_image_request(
    build: RequestBuilder, request: ImageRequest, response_format: ResponseFormat
) -> httpx.Request:
    headers = {"Accept": accept_header(request, response_format)}
    return build("POST", endpoint_path(request.model), json=request.api_body(), headers=headers)


def kontext_submit_request(
    build: RequestBuilder, model: str, body: dict[str, Any]
) -> httpx.Request:
    return build("POST", f"/workflows/accounts/fireworks/models/{model}", json=body)


def kontext_poll_request(build: RequestBuilder, model: str, request_id: str) -> httpx.Request:
    # The docs say GET; every working client POSTs, and so does the API.
    path = f"/workflows/accounts/fireworks/models/{model}/get_result"
    return build("POST", path, json={"id": request_id})


def shown_base_url(base_url: str) -> str:
    """A base URL fit for a message: without any user:password@ or query it may carry."""
    parts = urlsplit(base_url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else base_url


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


def build_download(build: RequestBuilder, url: str, base_url: str) -> httpx.Request:
    """A plain GET for a result URL, carrying Authorization only on the API's own origin."""
    request = build("GET", url, headers={"Accept": "image/*"})
    if not same_origin(url, base_url):
        request.headers.pop("Authorization", None)
    return request


def redact_url(url: str) -> str:
    """Scheme, host and path only: a signed URL's query string is a credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# --- Errors ---


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


def request_id_of(response: httpx.Response) -> str | None:
    return response.headers.get("x-request-id") or response.headers.get("fireworks-request-id")


def after_attempts(attempts: int) -> str:
    return f" after {attempts} attempts" if attempts > 1 else ""


def error_for_status(
    response: httpx.Response, attempts: int, *, base_url: str | None = None
) -> FluxError:
    """Map a non-2xx answer to the exception whose name tells the caller what to do.

    `base_url`: the one the client actually uses, named in a 404's message."""
    status = response.status_code
    detail = api_error_message(response)
    rid = request_id_of(response)
    after = after_attempts(attempts)
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
            f"Not found: {detail}. Check the model name and the base URL"
            + (f" ({shown_base_url(base_url)})" if base_url else " (FIREWORKS_BASE_URL)")
            + ".",
            status_code=status,
            request_id=rid,
        )
    return InvalidRequestError(
        f"Fireworks rejected the request: {detail}. Fix the request; retrying it will not help.",
        status_code=status,
        request_id=rid,
    )


def download_error(response: httpx.Response, url: str, attempts: int) -> FluxError:
    """A failed result download: 408/429/5xx are retried; 403/404/410 usually mean it expired."""
    status = response.status_code
    where = redact_url(url)
    after = after_attempts(attempts)
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


# --- Answers: text_to_image ---


def _finish_reason(value: Any) -> FinishReason:
    if value is None or value == "":
        return FinishReason.SUCCESS  # older clients treat a missing reason as success; so do we
    text = str(value).strip().upper()
    if text == FinishReason.SUCCESS:
        return FinishReason.SUCCESS
    if "FILTER" in text or "MODERATED" in text:
        return FinishReason.CONTENT_FILTERED
    raise ResponseError(f"unknown finish reason {str(value)[:40]!r} in the answer")


def parse_seed(value: Any) -> int | None:
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
    rid = request_id_of(response)
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
        seed = parse_seed(body.get("seed"))
        rid = rid or (str(body["id"]) if body.get("id") else None)
    elif content_type.startswith("image/") or content_type in ("", "application/octet-stream"):
        data = response.content
        finish = _finish_reason(response.headers.get("finish-reason"))
        seed = parse_seed(response.headers.get("seed"))
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


# --- Answers: FLUX Kontext submit, get_result, result download ---

KONTEXT_STATUSES = {
    name.lower(): name
    for name in (
        "Task not found",
        "Pending",
        "Request Moderated",
        "Content Moderated",
        "Ready",
        "Error",
    )
}


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
            request_id=request_id_of(response),
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
        status=KONTEXT_STATUSES.get(status.strip().lower(), status.strip()),
        result=result if isinstance(result, dict) else None,
        details=body.get("details"),
        progress=body.get("progress"),
    )


def parse_download(response: httpx.Response) -> bytes:
    """The image bytes of a result; a truncated or non-image body is retried (a re-download is free)."""
    try:
        sniff_image(response.content)
    except ResponseError as exc:
        exc.retryable = True
        raise
    return response.content
