"""A local stand-in for the Fireworks FLUX text_to_image API, speaking the real wire protocol.

The library, its tests, the demo and the benchmarks talk to this server exactly as they talk to
Fireworks (same route, headers, Accept negotiation, error bodies), so the code under test is the
code users run (the stripe-mock / moto idea). It binds to loopback only: it accepts any key when
unconfigured, so it must never be reachable from another machine.

Images are cheap, deterministic placeholders: a seeded gradient and shapes with the prompt and
seed written on them. They depend only on (prompt, seed, width, height), so caching and
"nothing generated twice" can be asserted on bytes.

Knobs (`EmulatorConfig`) add latency, random 429/5xx, a requests-per-minute window and content
filtering. Prompt markers trigger deterministic faults for tests, and stay part of the prompt:

- `[[status:NNN]]`: answer NNN (400-599) with an error body; a 429 also gets `Retry-After`.
- `[[flaky:N]]`: the first N requests for this exact (prompt, seed) get 503.
- `[[fault:drop]]`: headers with the full Content-Length, half the body, then the connection drops.
- `[[fault:truncate]]`: 200 with a consistent Content-Length but the image cut in half.
- `[[fault:garbage]]`: 200 with an image content type whose bytes are not an image.
- `[[fault:html]]`: 200 `text/html` page, as a misbehaving proxy would send.
- `[[fault:json-no-images]]`: 200 JSON with `"base64": []`.
- `[[fault:slow=S]]`: wait S seconds before answering (on top of the configured latency).

FLUX Kontext (`flux-kontext-pro`, `flux-kontext-max`) is asynchronous, as on Fireworks: submit to
`.../models/{model}` answers `{"request_id"}`; `.../models/{model}/get_result` with `{"id"}` answers
`{id, status, result, progress, details}`: `Pending` for `kontext_pending_s`, then `Ready` with
`result.sample`, a URL on this emulator (`/_emulator/results/<id>.<ext>`, plain GET, no key needed,
like a signed URL) and `result.seed`. An unknown id is `Task not found`. An edit's picture is the
input image itself, fitted to the size, tinted per seed, with the prompt drawn on it; an input URL
is not fetched, only hashed. A prompt with a filter word is `Content Moderated` (Kontext always
moderates). Markers, for tests:

- `[[kontext:request-moderated]]`: `Request Moderated` at once (the input was refused).
- `[[kontext:error]]`: `Error` with `details` once pending time is over.
- `[[kontext:not-found-first=N]]`: the first N polls answer `Task not found` (transient).

`[[status:NNN]]` and `[[flaky:N]]` apply to the submit call. A `Ready` or `Content Moderated`
task counts as one generation, once, however often it is polled.
"""

from __future__ import annotations

import asyncio
import base64
import colorsys
import contextlib
import contextvars
import dataclasses
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import random
import re
import secrets
import socket
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from typing import Any, Literal

import anyio.to_thread
import uvicorn
from PIL import Image, ImageDraw, ImageFont, ImageOps
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flux_flows.models import (
    ASPECT_RATIO_SIZES,
    DEFAULT_STEPS,
    KONTEXT_MODELS,
    MAX_GUIDANCE,
    MAX_SAFETY_TOLERANCE,
    MAX_SEED,
    MAX_STEPS,
    MODELS,
)

__all__ = [
    "GENERATION_PATH",
    "Emulator",
    "EmulatorConfig",
    "EmulatorStats",
    "create_app",
    "render_image",
    "serve",
]

GENERATION_PATH = "/inference/v1/workflows/accounts/fireworks/models/{model}/text_to_image"
KONTEXT_SUBMIT_PATH = "/inference/v1/workflows/accounts/fireworks/models/{model}"
KONTEXT_RESULT_PATH = "/inference/v1/workflows/accounts/fireworks/models/{model}/get_result"
RESULTS_PATH = "/_emulator/results/{name}"
# Every API route is metered: text_to_image, Kontext submit and get_result.
_GENERATION_RE = re.compile(
    r"^/inference/v1/workflows/accounts/fireworks/models/[^/]+(/text_to_image|/get_result)?$"
)
API_PREFIX = "/inference/v1"

DEFAULT_ASPECT_RATIO = "1:1"
DEFAULT_GUIDANCE = 3.5
DEFAULT_JPEG_QUALITY = 90
MAX_BODY_BYTES = 1024 * 1024
# A Kontext submit carries the input image as a data URI: allow ~20 MiB of image.
KONTEXT_MAX_BODY_BYTES = 32 * 1024 * 1024
KONTEXT_MAX_TASKS = 2048  # oldest tasks (and their results) are forgotten beyond this
KONTEXT_DEFAULT_SAFETY_TOLERANCE = 2
RATE_WINDOW_S = 60.0
_PROMPT_CHARS_DRAWN = 200

Mode = Literal["jpeg", "png", "json"]
_CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png"}


def _now() -> float:
    """Clock of the rate-limit window; a module function so tests can move time without sleeping."""
    return time.monotonic()


# --------------------------------------------------------------------------------------------
# Configuration and counters
# --------------------------------------------------------------------------------------------


@dataclass
class EmulatorConfig:
    """Behaviour knobs. Mutable so a running emulator can be reconfigured between test phases."""

    api_key: str | None = field(default=None, repr=False)
    latency_s: float = 0.0
    jitter_s: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float | None = 1.0
    rate_5xx: float = 0.0
    status_5xx: int = 503
    rpm_limit: int | None = None
    # More requests than this in flight at once -> 429, as an account over its capacity answers;
    # unlike rate_429, backing off helps, which is what adaptive clients need to be tested against.
    max_concurrent: int | None = None
    filter_words: tuple[str, ...] = ("nsfw", "forbidden")
    image_kb: int | None = None
    fault_seed: int = 0
    # Kontext: how long a task stays Pending, and the origin its result URLs name (default: the
    # origin the client called, so results come from this server; another spelling of the same
    # address, e.g. http://localhost:PORT, lets tests see a result on a "foreign" host).
    kontext_pending_s: float = 0.3
    kontext_results_url: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.filter_words, str):
            self.filter_words = (self.filter_words,)
        self.filter_words = tuple(str(word) for word in self.filter_words)
        self.validate()

    def validate(self) -> None:
        """Fail at configuration time, not as a confusing answer in the middle of a run."""
        if self.api_key is not None and (
            not isinstance(self.api_key, str) or not self.api_key.strip()
        ):
            raise ValueError("api_key must be None (accept any key) or a non-empty string")
        for name in ("latency_s", "jitter_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("rate_429", "rate_5xx"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in 0..1")
        if self.rate_429 + self.rate_5xx > 1.0:
            raise ValueError("rate_429 + rate_5xx must not exceed 1")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError("retry_after_s must be None or >= 0")
        if not 500 <= self.status_5xx <= 599:
            raise ValueError("status_5xx must be in 500..599")
        if self.rpm_limit is not None and self.rpm_limit < 1:
            raise ValueError("rpm_limit must be None or >= 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError("max_concurrent must be None or >= 1")
        if self.image_kb is not None and self.image_kb < 1:
            raise ValueError("image_kb must be None or >= 1")
        if self.kontext_pending_s < 0:
            raise ValueError("kontext_pending_s must be >= 0")
        if self.kontext_results_url is not None and not str(self.kontext_results_url).startswith(
            ("http://", "https://")
        ):
            raise ValueError("kontext_results_url must be None or an http(s):// origin")

    def public_dict(self) -> dict[str, Any]:
        """The configuration as JSON-able data, with the key reduced to whether one is set."""
        data = dataclasses.asdict(self)
        data["api_key"] = None if self.api_key is None else "<set>"
        data["filter_words"] = list(self.filter_words)
        return data


def _apply_changes(config: EmulatorConfig, changes: dict[str, Any]) -> None:
    """Validate the whole new configuration first, so a bad change leaves the old one intact."""
    known = {f.name for f in dataclasses.fields(EmulatorConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown emulator setting(s): {', '.join(unknown)}")
    candidate = dataclasses.replace(config, **changes)
    for name in changes:
        setattr(config, name, getattr(candidate, name))


@dataclass
class EmulatorStats:
    """What the server saw, readable from any thread while it runs.

    `generations` is what a user would be billed for: every answer that carried a generated image,
    including CONTENT_FILTERED ones and the `truncate`/`garbage`/`drop` faults (the provider did the
    work and billed it; only the delivery broke). Error statuses, `html` and `json-no-images`
    answers and requests abandoned by the client during the wait are not generations.

    For Kontext, `requests` counts submits and polls (every call to the API routes), and a task
    is one generation when first seen `Ready` or `Content Moderated`; result downloads are not
    API calls and are counted apart, in `downloads`.
    """

    requests: int = 0
    generations: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    generated: Counter[tuple[Any, ...]] = field(default_factory=Counter)
    # Kontext result downloads (not API calls), and how many of them carried an Authorization
    # header: a client must send the key only to the API's own origin.
    downloads: int = 0
    downloads_with_auth: int = 0
    _cond: threading.Condition = field(
        default_factory=threading.Condition, init=False, repr=False, compare=False
    )

    @property
    def duplicates(self) -> int:
        """How many distinct generations were produced more than once (money spent twice)."""
        with self._cond:
            return sum(1 for count in self.generated.values() if count > 1)

    def as_dict(self) -> dict[str, Any]:
        with self._cond:
            return {
                "requests": self.requests,
                "generations": self.generations,
                "by_status": dict(self.by_status),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "generated_unique": len(self.generated),
                "generated_duplicates": sum(1 for c in self.generated.values() if c > 1),
                "downloads": self.downloads,
                "downloads_with_auth": self.downloads_with_auth,
            }

    def reset(self) -> None:
        with self._cond:
            self.requests = self.generations = 0
            self.downloads = self.downloads_with_auth = 0
            self.by_status = {}
            self.max_in_flight = self.in_flight
            self.generated = Counter()
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[EmulatorStats], bool], timeout: float = 10.0) -> bool:
        """Block until `predicate(stats)` holds: lets tests wait on events instead of sleeping."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def record_start(self) -> None:
        with self._cond:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._cond.notify_all()

    def record_finish(self, status: int) -> None:
        with self._cond:
            self.in_flight -= 1
            self.by_status[status] = self.by_status.get(status, 0) + 1
            self._cond.notify_all()

    def record_generation(self, key: tuple[Any, ...]) -> None:
        with self._cond:
            self.generations += 1
            self.generated[key] += 1
            self._cond.notify_all()

    def record_download(self, *, with_auth: bool) -> None:
        with self._cond:
            self.downloads += 1
            self.downloads_with_auth += with_auth
            self._cond.notify_all()


# --------------------------------------------------------------------------------------------
# Errors in the API's shape
# --------------------------------------------------------------------------------------------

_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "invalid_request_error"),
    401: ("UNAUTHENTICATED", "authentication_error"),
    402: ("PAYMENT_REQUIRED", "payment_required_error"),
    403: ("PERMISSION_DENIED", "permission_error"),
    404: ("NOT_FOUND", "not_found_error"),
    405: ("METHOD_NOT_ALLOWED", "invalid_request_error"),
    408: ("DEADLINE_EXCEEDED", "timeout_error"),
    412: ("FAILED_PRECONDITION", "account_suspended_error"),
    413: ("PAYLOAD_TOO_LARGE", "invalid_request_error"),
    429: ("RESOURCE_EXHAUSTED", "rate_limit_error"),
    500: ("INTERNAL", "server_error"),
    502: ("BAD_GATEWAY", "server_error"),
    503: ("UNAVAILABLE", "server_error"),
    504: ("DEADLINE_EXCEEDED", "server_error"),
}
_INVALID_KEY_MESSAGE = "The API key you provided is invalid."


class _ApiError(Exception):
    """An answer other than an image; raised anywhere in the handler, rendered in one place."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message or _status_phrase(status)
        self.param = param
        self.headers = headers or {}


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _new_request_id() -> str:
    return uuid.uuid4().hex


def _error_response(error: _ApiError, request_id: str) -> JSONResponse:
    code, kind = _ERROR_KINDS.get(error.status, ("UNKNOWN", "api_error"))
    body = {
        "error": {"message": error.message, "code": code, "type": kind, "param": error.param},
        "request_id": request_id,
    }
    headers = {"x-request-id": request_id, **error.headers}
    return JSONResponse(body, status_code=error.status, headers=headers)


def _format_retry_after(seconds: float) -> str:
    """Whole seconds as HTTP specifies; fractions kept so fast tests can use sub-second waits."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _retry_after_headers(config: EmulatorConfig) -> dict[str, str]:
    if config.retry_after_s is None:
        return {}
    return {"Retry-After": _format_retry_after(config.retry_after_s)}


# --------------------------------------------------------------------------------------------
# Request parsing and validation, as the real API answers it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Generation:
    model: str
    prompt: str
    aspect_ratio: str
    guidance_scale: float
    num_inference_steps: int
    seed: int  # as requested: 0 means "pick one"
    safety_check: bool


def _short_repr(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_object(raw: bytes, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    if len(raw) > limit:
        raise _ApiError(413, f"request body is larger than {limit} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise _ApiError(400, "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "request body must be a JSON object")
    return body


def _prompt(body: dict[str, Any]) -> str:
    value = body.get("prompt")
    if not isinstance(value, str) or not value.strip():
        raise _ApiError(400, "prompt is required and must be a non-empty string", param="prompt")
    return value


def _aspect_ratio(body: dict[str, Any]) -> str:
    value = body.get("aspect_ratio")
    if value is None:
        return DEFAULT_ASPECT_RATIO
    if not isinstance(value, str) or value not in ASPECT_RATIO_SIZES:
        allowed = ", ".join(ASPECT_RATIO_SIZES)
        raise _ApiError(
            400,
            f"aspect_ratio must be one of {allowed}; got {_short_repr(value)}",
            param="aspect_ratio",
        )
    return value


def _guidance(body: dict[str, Any]) -> float:
    value = body.get("guidance_scale")
    if value is None:
        return DEFAULT_GUIDANCE
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= MAX_GUIDANCE:
        raise _ApiError(
            400,
            f"guidance_scale must be a number with 0 < guidance_scale <= {MAX_GUIDANCE:g}; "
            f"got {_short_repr(value)}",
            param="guidance_scale",
        )
    return float(value)


def _bounded_int(
    body: dict[str, Any], name: str, low: int, high: int, default: int, note: str
) -> int:
    """JSON booleans are not integers here, as in the API's typed (protobuf) request schema."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _ApiError(
            400,
            f"{name} must be an integer in {low}..{high}{note}; got {_short_repr(value)}",
            param=name,
        )
    return value


def _safety_check(body: dict[str, Any]) -> bool:
    value = body.get("safety_check")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _ApiError(
            400,
            f"safety_check must be true or false; got {_short_repr(value)}",
            param="safety_check",
        )
    return value


def _parse_generation(raw: bytes, model: str) -> _Generation:
    """Validate like the API: defaults for absent or null fields, unknown fields ignored."""
    body = _json_object(raw)
    return _Generation(
        model=model,
        prompt=_prompt(body),
        aspect_ratio=_aspect_ratio(body),
        guidance_scale=_guidance(body),
        num_inference_steps=_bounded_int(
            body, "num_inference_steps", 1, MAX_STEPS[model], DEFAULT_STEPS[model], f" for {model}"
        ),
        seed=_bounded_int(body, "seed", 0, MAX_SEED, 0, " (0 picks a random seed)"),
        safety_check=_safety_check(body),
    )


@dataclass(frozen=True)
class _KontextJob:
    """A validated Kontext submit. `input_hash` identifies the input: bytes of a data URI, or the
    URL string itself (the emulator fetches nothing)."""

    model: str
    prompt: str
    seed: int  # as requested: 0 means "pick one"
    aspect_ratio: str
    output_format: Literal["jpeg", "png"]
    safety_tolerance: int
    prompt_upsampling: bool
    input_hash: str | None = None


def _kontext_input(body: dict[str, Any]) -> tuple[str | None, bytes | None]:
    value = body.get("input_image")
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip():
        raise _ApiError(
            400, "input_image must be a base64 data URI or an http(s) URL", param="input_image"
        )
    if value.startswith(("http://", "https://")):
        return hashlib.sha256(value.encode()).hexdigest(), None
    header, sep, payload = value.partition(",")
    if not (value.startswith("data:image/") and sep and header.endswith(";base64")):
        raise _ApiError(
            400,
            "input_image must be a base64 data URI (data:image/...;base64,...) or an http(s) URL",
            param="input_image",
        )
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
    except (ValueError, OSError):
        raise _ApiError(400, "input_image is not a decodable image", param="input_image") from None
    return hashlib.sha256(data).hexdigest(), data


def _parse_kontext(raw: bytes, model: str) -> tuple[_KontextJob, bytes | None]:
    """Validate a Kontext submit like the API: defaults for absent fields, unknown ones ignored.

    Returns the job and the decoded input image (kept by the task only until it is rendered).
    """
    body = _json_object(raw, KONTEXT_MAX_BODY_BYTES)
    prompt = _prompt(body)
    output_format = body.get("output_format")
    if output_format is None:
        output_format = "jpeg"
    if output_format not in ("jpeg", "png"):
        raise _ApiError(
            400,
            f"output_format must be jpeg or png; got {_short_repr(output_format)}",
            param="output_format",
        )
    upsampling = body.get("prompt_upsampling")
    if upsampling is not None and not isinstance(upsampling, bool):
        raise _ApiError(
            400,
            f"prompt_upsampling must be true or false; got {_short_repr(upsampling)}",
            param="prompt_upsampling",
        )
    input_hash, input_bytes = _kontext_input(body)
    job = _KontextJob(
        model=model,
        prompt=prompt,
        seed=_bounded_int(body, "seed", 0, MAX_SEED, 0, " (0 picks a random seed)"),
        aspect_ratio=_aspect_ratio(body),
        output_format=output_format,
        safety_tolerance=_bounded_int(
            body, "safety_tolerance", 0, MAX_SAFETY_TOLERANCE, KONTEXT_DEFAULT_SAFETY_TOLERANCE, ""
        ),
        prompt_upsampling=bool(upsampling),
        input_hash=input_hash,
    )
    return job, input_bytes


def _check_auth(header: str | None, expected: str | None) -> None:
    """Constant-time compare; the same message whatever went wrong, and never the key itself."""
    scheme, _, key = (header or "").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or any(ch.isspace() for ch in key):
        raise _ApiError(401, _INVALID_KEY_MESSAGE)
    if expected is not None and not hmac.compare_digest(key.encode(), expected.encode()):
        raise _ApiError(401, _INVALID_KEY_MESSAGE)


_ACCEPT_MODES: dict[str, Mode] = {
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/png": "png",
    "application/json": "json",
    "application/*": "json",
    "image/*": "jpeg",
    "*/*": "jpeg",
}


def negotiate(accept: str | None) -> Mode:
    """Pick the answer format: highest q among supported types, JPEG when nothing matches.

    JPEG is the fallback (not 406) because clients that send no Accept header, or one the API does
    not know, get a JPEG from the real service.
    """
    best: tuple[float, int, Mode] | None = None
    for index, item in enumerate((accept or "").split(",")):
        media, *params = (part.strip() for part in item.split(";"))
        mode = _ACCEPT_MODES.get(media.lower())
        if mode is None:
            continue
        quality = _q_value(params)
        if quality <= 0:
            continue
        candidate = (quality, -index, mode)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    return best[2] if best else "jpeg"


def _q_value(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value)
            except ValueError:
                return 0.0
            return quality if math.isfinite(quality) else 0.0
    return 1.0


def _jpeg_quality(header: str | None) -> int:
    """Honour `Jpeg-Quality` when it is an integer 0-100; otherwise ignore it, leniently."""
    try:
        quality = int((header or "").strip())
    except ValueError:
        return DEFAULT_JPEG_QUALITY
    return quality if 0 <= quality <= 100 else DEFAULT_JPEG_QUALITY


# --------------------------------------------------------------------------------------------
# Prompt markers
# --------------------------------------------------------------------------------------------

_MARKER_RE = re.compile(
    r"\[\[\s*(status|flaky|fault|kontext)\s*:\s*([^\]]*?)\s*\]\]", re.IGNORECASE
)
_FAULT_MODES = ("drop", "truncate", "garbage", "html", "json-no-images")
_MAX_SLOW_S = 600.0


@dataclass(frozen=True)
class _Markers:
    status: int | None = None
    flaky: int = 0
    mode: str | None = None
    slow_s: float = 0.0
    kontext: str | None = None  # "request-moderated" or "error"
    not_found_first: int = 0


def _parse_markers(prompt: str) -> _Markers:
    """Markers live in the prompt so any client, in any process, can trigger a fault."""
    status: int | None = None
    flaky = 0
    mode: str | None = None
    slow_s = 0.0
    kontext: str | None = None
    not_found_first = 0
    for kind, raw in _MARKER_RE.findall(prompt):
        kind, value = kind.lower(), raw.lower()
        if kind == "status" and value.isdigit() and 400 <= int(value) <= 599 and status is None:
            status = int(value)
        elif kind == "flaky" and value.isdigit():
            flaky = int(value)
        elif kind == "fault" and value.startswith("slow="):
            with contextlib.suppress(ValueError):
                slow_s = min(max(float(value[5:]), 0.0), _MAX_SLOW_S)
        elif kind == "fault" and value in _FAULT_MODES and mode is None:
            mode = value
        elif kind == "kontext" and value.startswith("not-found-first="):
            with contextlib.suppress(ValueError):
                not_found_first = max(int(value.partition("=")[2]), 0)
        elif kind == "kontext" and value in ("request-moderated", "error") and kontext is None:
            kontext = value
    return _Markers(
        status=status,
        flaky=flaky,
        mode=mode,
        slow_s=slow_s,
        kontext=kontext,
        not_found_first=not_found_first,
    )


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

_fonts = threading.local()
_NOISE_STRIPE = 16  # rows; one JPEG MCU at 4:2:0, so noisy stripes never share blocks with text


def _seeded(*parts: Any) -> random.Random:
    """A generator seeded from a stable hash: same parts, same numbers, in every process."""
    payload = json.dumps(parts, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return random.Random(int.from_bytes(hashlib.sha256(payload).digest()[:16], "big"))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """One font object per thread: FreeType faces must not be shared by concurrent renders."""
    cache: dict[int, Any] = _fonts.__dict__.setdefault("by_size", {})
    if size not in cache:
        try:
            cache[size] = ImageFont.load_default(size=size)
        except (ImportError, OSError):  # Pillow without FreeType: small bitmap font
            cache[size] = ImageFont.load_default()
    return cache[size]


def _vivid(rng: random.Random, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), 0.45 + 0.5 * rng.random(), value)
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass(frozen=True)
class _Layout:
    margin: int
    font_size: int
    caption_bottom: int
    label_top: int


def _layout(width: int, height: int, lines: int) -> _Layout:
    font_size = max(12, round(min(width, height) / 28))
    margin = max(8, font_size // 2)
    line_height = round(font_size * 1.25)
    caption_bottom = margin + 2 * margin + lines * line_height
    label_top = height - margin - line_height - 2 * margin
    return _Layout(margin, font_size, caption_bottom, label_top)


def _caption_lines(prompt: str, width: int, font_size: int) -> list[str]:
    text = "".join(ch if ch.isprintable() else " " for ch in prompt[:_PROMPT_CHARS_DRAWN])
    if len(prompt) > _PROMPT_CHARS_DRAWN:
        text += "..."
    per_line = max(8, int((width - 4 * font_size) / (font_size * 0.47)))
    return textwrap.wrap(text, per_line, max_lines=6, placeholder=" ...") or [""]


def _paint_background(image: Image.Image, rng: random.Random) -> None:
    """Bands of solid colour: a gradient at the cost of a few memsets (a real resize is ~6 ms)."""
    width, height = image.size
    start, end = _vivid(rng, 0.95), _vivid(rng, 0.35)
    vertical = rng.random() < 0.5
    span = height if vertical else width
    bands = 48
    for i in range(bands):
        f = i / (bands - 1)
        colour = tuple(round(a + (b - a) * f) for a, b in zip(start, end, strict=True))
        lo, hi = i * span // bands, (i + 1) * span // bands
        box = (0, lo, width, hi) if vertical else (lo, 0, hi, height)
        image.paste(colour, box)


def _paint_shapes(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    scale = min(width, height)
    for _ in range(rng.randint(3, 6)):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randint(scale // 12, scale // 4)
        colour = _vivid(rng, 0.6 + 0.4 * rng.random())
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif kind == 1:
            draw.rectangle((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)


def _paint_text(
    draw: ImageDraw.ImageDraw, lines: list[str], label: str, box: _Layout, width: int
) -> None:
    font = _font(box.font_size)
    m = box.margin
    draw.rectangle((m, m, width - m, box.caption_bottom), fill=(12, 12, 16))
    draw.multiline_text((2 * m, 2 * m), "\n".join(lines), font=font, fill=(245, 245, 245))
    label_width = int(draw.textlength(label, font=font)) + 4 * m
    draw.rectangle(
        (m, box.label_top, m + label_width, box.label_top + 2 * m + box.font_size * 1.25),
        fill=(12, 12, 16),
    )
    draw.text((3 * m, box.label_top + m), label, font=font, fill=(245, 245, 245))


def render_image(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """The placeholder picture for (prompt, seed, size): identical pixels for identical inputs.

    Seeded colours and shapes make two seeds of one prompt obviously different to a person; the
    prompt and seed are written on it so a contact sheet can be checked by eye.
    """
    return _render(prompt, seed, width, height)[0]


def _render(
    prompt: str, seed: int, width: int, height: int, salt: tuple[Any, ...] = ()
) -> tuple[Image.Image, _Layout]:
    rng = _seeded("flux-flows-emulator", prompt, seed, width, height, *salt)
    image = Image.new("RGB", (width, height))
    _paint_background(image, rng)
    draw = ImageDraw.Draw(image)
    _paint_shapes(draw, rng, width, height)
    lines = _caption_lines(prompt, width, _layout(width, height, 1).font_size)
    layout = _layout(width, height, len(lines))
    _paint_text(draw, lines, f"seed {seed}  {width}x{height}", layout, width)
    return image, layout


def _encode(image: Image.Image, mode: Mode, quality: int) -> bytes:
    """PNG at compress level 1: the JSON answer must stay cheap, and size barely matters here."""
    out = io.BytesIO()
    if mode == "jpeg":
        image.save(out, "JPEG", quality=quality)
    else:
        image.save(out, "PNG", compress_level=1)
    return out.getvalue()


@lru_cache(maxsize=64)
def _blank(width: int, height: int, mode: Mode, quality: int) -> bytes:
    """What a filtered generation returns: all black, so it cannot pass for a real image."""
    return _encode(Image.new("RGB", (width, height)), mode, quality)


def _noise_stripe(width: int, seed_parts: tuple[Any, ...]) -> Image.Image:
    data = _seeded("noise", *seed_parts).randbytes(width * _NOISE_STRIPE * 3)
    return Image.frombytes("RGB", (width, _NOISE_STRIPE), data)


@lru_cache(maxsize=64)
def _bytes_per_noisy_stripe(width: int, quality: int) -> float:
    """Cost of one noisy stripe, measured once on a fixed reference so sizes stay deterministic."""
    rows = 8
    height = rows * _NOISE_STRIPE
    plain = Image.new("RGB", (width, height), (128, 128, 128))
    noisy = plain.copy()
    _add_noise(noisy, list(range(rows)), 0, _noise_stripe(width, ("calibration", width)))
    extra = len(_encode(noisy, "jpeg", quality)) - len(_encode(plain, "jpeg", quality))
    return max(extra / rows, 1.0)


def _add_noise(image: Image.Image, stripes: list[int], top: int, noise: Image.Image) -> None:
    for index in stripes:
        box = (0, top + index * _NOISE_STRIPE, image.width, top + (index + 1) * _NOISE_STRIPE)
        image.paste(Image.blend(image.crop(box), noise, 0.5), box)


def _spread(count: int, available: int) -> list[int]:
    """`count` stripe indices spaced evenly, so the texture covers the picture, not one band."""
    count = max(0, min(count, available))
    return sorted({i * available // count for i in range(count)}) if count else []


def _jpeg_of_size(
    image: Image.Image, quality: int, target: int, layout: _Layout, seed_parts: tuple[Any, ...]
) -> bytes:
    """A JPEG of about `target` bytes (benchmarks need realistic transfer sizes, ~100-400 KB).

    Seeded noise stripes are blended in between the caption and the label; JPEG size grows about
    linearly with the number of noisy stripes, so one correction step lands within +-25%.
    """
    plain = _encode(image, "jpeg", quality)
    if len(plain) >= target * 0.75:
        return plain
    top = -(-layout.caption_bottom // _NOISE_STRIPE) * _NOISE_STRIPE + _NOISE_STRIPE
    available = max(0, (layout.label_top - top) // _NOISE_STRIPE)
    per_stripe = _bytes_per_noisy_stripe(image.width, quality)
    noise = _noise_stripe(image.width, seed_parts)
    count = math.ceil((target - len(plain)) / per_stripe)
    result = plain
    for _ in range(2):
        noisy = image.copy()
        _add_noise(noisy, _spread(count, available), top, noise)
        result = _encode(noisy, "jpeg", quality)
        if abs(len(result) - target) <= target * 0.2 or count >= available:
            break
        observed = max((len(result) - len(plain)) / max(count, 1), 1.0)
        count = math.ceil((target - len(plain)) / observed)
    return result


def _image_bytes(
    gen: _Generation, seed: int, mode: Mode, quality: int, filtered: bool, image_kb: int | None
) -> bytes:
    """Runs in a worker thread: rendering and encoding are the only CPU-heavy part of a request."""
    width, height = ASPECT_RATIO_SIZES[gen.aspect_ratio]
    file_mode: Mode = "png" if mode == "json" else mode
    if filtered:
        return _blank(width, height, file_mode, quality)
    image, layout = _render(gen.prompt, seed, width, height)
    if file_mode == "jpeg" and image_kb:
        seed_parts = (gen.prompt, seed, width, height)
        return _jpeg_of_size(image, quality, image_kb * 1024, layout, seed_parts)
    return _encode(image, file_mode, quality)


def _render_edit(source: bytes, prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """An edit that visibly comes from its input: the input fitted to the size, a per-seed tint
    and the prompt drawn on it, so a contact sheet shows which photo each result was made from."""
    with Image.open(io.BytesIO(source)) as opened:
        base = ImageOps.fit(opened.convert("RGB"), (width, height), Image.Resampling.BILINEAR)
    rng = _seeded("flux-flows-emulator-edit", prompt, seed, width, height)
    image = Image.blend(base, Image.new("RGB", (width, height), _vivid(rng, 0.9)), 0.25)
    lines = _caption_lines(prompt, width, _layout(width, height, 1).font_size)
    layout = _layout(width, height, len(lines))
    _paint_text(ImageDraw.Draw(image), lines, f"edit  seed {seed}  {width}x{height}", layout, width)
    return image


def _kontext_image_bytes(task: _KontextTask) -> bytes:
    """Runs in a worker thread. Depends only on (prompt, seed, size, input image hash)."""
    job = task.job
    width, height = ASPECT_RATIO_SIZES[job.aspect_ratio]
    if task.input_bytes is not None:
        image = _render_edit(task.input_bytes, job.prompt, task.seed, width, height)
    else:
        salt = (job.input_hash,) if job.input_hash else ()
        image = _render(job.prompt, task.seed, width, height, salt)[0]
    return _encode(image, job.output_format, DEFAULT_JPEG_QUALITY)


def _garbage(size: int = 4096) -> bytes:
    """Bytes no image decoder accepts (no JPEG/PNG magic), yet looking like a plausible payload."""
    return b"NOT-AN-IMAGE\n" + _seeded("garbage").randbytes(size)


_HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
    "<h1>502 Bad Gateway</h1><p>The upstream server did not answer in time.</p>"
    "<hr><address>edge-proxy</address></body></html>"
)


# --------------------------------------------------------------------------------------------
# Runtime state shared by requests: fault RNG, flaky counters, rate window, Kontext tasks
# --------------------------------------------------------------------------------------------


@dataclass
class _KontextTask:
    """One submitted Kontext task. Its status is decided when polled (see `_EmulatorState.poll`);
    the picture is rendered on first download and kept until the task is forgotten."""

    id: str
    job: _KontextJob
    seed: int
    markers: _Markers
    created: float
    results_origin: str
    polls: int = 0
    billed: bool = False
    ready: bool = False
    input_bytes: bytes | None = field(default=None, repr=False)
    image: bytes | None = field(default=None, repr=False)

    @property
    def extension(self) -> str:
        return "jpg" if self.job.output_format == "jpeg" else "png"

    def generation_key(self) -> tuple[Any, ...]:
        job = self.job
        return (
            job.model,
            job.prompt,
            self.seed,
            job.aspect_ratio,
            job.input_hash,
            job.safety_tolerance,
            job.prompt_upsampling,
            job.output_format,
        )


def _poll_body(
    task_id: str,
    status: str,
    *,
    result: dict[str, Any] | None = None,
    progress: float | None = None,
    details: Any = None,
) -> dict[str, Any]:
    """Every poll answer has the same keys; `result` is null until Ready."""
    return {
        "id": task_id,
        "status": status,
        "result": result,
        "progress": progress,
        "details": details,
    }


class _EmulatorState:
    """What changes between requests; locked because tests reset it from other threads."""

    def __init__(self, config: EmulatorConfig, stats: EmulatorStats) -> None:
        self.config = config
        self.stats = stats
        self._lock = threading.Lock()
        self._rng = random.Random(config.fault_seed)
        self._flaky: Counter[tuple[str, int]] = Counter()
        self._window: deque[float] = deque()
        self._tasks: dict[str, _KontextTask] = {}

    def configure(self, changes: dict[str, Any]) -> None:
        with self._lock:
            _apply_changes(self.config, changes)
            if "fault_seed" in changes:
                self._rng = random.Random(self.config.fault_seed)

    def reset(self) -> None:
        """Back to a fresh emulator: counters, flaky memory, rate window, fault RNG."""
        with self._lock:
            self._rng = random.Random(self.config.fault_seed)
            self._flaky.clear()
            self._window.clear()
            self._tasks.clear()
        self.stats.reset()

    def add_task(self, task: _KontextTask) -> None:
        """Remember a task; the oldest are forgotten beyond KONTEXT_MAX_TASKS (results expire)."""
        with self._lock:
            self._tasks[task.id] = task
            while len(self._tasks) > KONTEXT_MAX_TASKS:
                self._tasks.pop(next(iter(self._tasks)))

    def poll(self, model: str, task_id: str) -> dict[str, Any]:
        """The status of a task now: decided from its markers, its age and its prompt."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.job.model != model:
                return _poll_body(task_id, "Task not found")
            task.polls += 1
            markers = task.markers
            if task.polls <= markers.not_found_first:
                return _poll_body(task_id, "Task not found")
            if markers.kontext == "request-moderated":
                task.input_bytes = None
                reasons = {"moderation_reasons": ["input refused ([[kontext:request-moderated]])"]}
                return _poll_body(task_id, "Request Moderated", details=reasons)
            pending_s = self.config.kontext_pending_s
            age = _now() - task.created
            if age < pending_s:
                return _poll_body(task_id, "Pending", progress=round(age / pending_s, 2))
            if markers.kontext == "error":
                task.input_bytes = None
                details = {"message": "the task failed in the emulator ([[kontext:error]])"}
                return _poll_body(task_id, "Error", details=details)
            if not task.billed:
                task.billed = True
                self.stats.record_generation(task.generation_key())
            lowered = task.job.prompt.lower()
            words = [w for w in self.config.filter_words if w and w.lower() in lowered]
            if words:
                task.input_bytes = None
                reasons = {"moderation_reasons": [f"filtered word: {w}" for w in words]}
                return _poll_body(task_id, "Content Moderated", progress=1.0, details=reasons)
            task.ready = True
            sample = f"{task.results_origin}/_emulator/results/{task.id}.{task.extension}"
            result = {"sample": sample, "seed": task.seed}
            return _poll_body(task_id, "Ready", result=result, progress=1.0)

    def ready_task(self, name: str) -> _KontextTask | None:
        """The task whose result `name` (`<id>.<ext>`) is, if it has been seen Ready."""
        task_id, _, extension = name.rpartition(".")
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None or not task.ready or task.extension != extension:
            return None
        return task

    def admit(self, gen: _Generation | _KontextJob, markers: _Markers) -> dict[str, str]:
        """Decide, atomically, whether this request is served; returns its rate-limit headers.

        Order: rate window, then flaky marker, then random faults. Only admitted requests take a
        slot in the window, as the contract's window counts accepted generations.
        """
        with self._lock:
            limit_headers = self._check_window()
            busy = self.config.max_concurrent
            if busy is not None and self.stats.in_flight > busy:
                raise _ApiError(
                    429,
                    f"Too many concurrent requests (more than {busy}); slow down.",
                    headers=_retry_after_headers(self.config),
                )
            if markers.flaky:
                key = (gen.prompt, gen.seed)
                self._flaky[key] += 1
                if self._flaky[key] <= markers.flaky:
                    raise _ApiError(503, "The service is temporarily unavailable (flaky marker).")
            self._random_fault()
            if self.config.rpm_limit is not None:
                self._window.append(_now())
                limit_headers = self._limit_headers(over=False)
            return limit_headers

    def _check_window(self) -> dict[str, str]:
        limit = self.config.rpm_limit
        if limit is None:
            return {}
        now = _now()
        while self._window and self._window[0] <= now - RATE_WINDOW_S:
            self._window.popleft()
        if len(self._window) >= limit:
            wait = max(1, math.ceil(self._window[0] + RATE_WINDOW_S - now))
            headers = {**self._limit_headers(over=True), "Retry-After": str(wait)}
            raise _ApiError(
                429, f"Request rate limit of {limit} requests per minute exceeded.", headers=headers
            )
        return self._limit_headers(over=False)

    def _limit_headers(self, *, over: bool) -> dict[str, str]:
        limit = self.config.rpm_limit or 0
        return {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(max(0, limit - len(self._window))),
            "x-ratelimit-over-limit": "yes" if over else "no",
        }

    def _random_fault(self) -> None:
        config = self.config
        if config.rate_429 <= 0 and config.rate_5xx <= 0:
            return
        draw = self._rng.random()
        if draw < config.rate_429:
            raise _ApiError(
                429, "Too many requests, please slow down.", headers=_retry_after_headers(config)
            )
        if draw < config.rate_429 + config.rate_5xx:
            raise _ApiError(config.status_5xx)


# --------------------------------------------------------------------------------------------
# The ASGI application
# --------------------------------------------------------------------------------------------

_dropping: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flux_emulator_dropping", default=False
)


class _QuietDrops(logging.Filter):
    """Hides uvicorn's error line for connections we cut on purpose (`[[fault:drop]]`) only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_dropping.get() and "without completing response" in str(record.msg))


def _install_log_filter() -> None:
    target = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDrops) for f in target.filters):
        target.addFilter(_QuietDrops())


class _DroppedResponse(Response):
    """Promises the whole body, sends half, and returns: uvicorn then closes the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send(
            {
                "type": "http.response.body",
                "body": self.body[: len(self.body) // 2],
                "more_body": True,
            }
        )
        _dropping.set(True)


class _Meter:
    """Counts generation-route traffic around the whole handler, latency and body included.

    A request is counted as finished just before its last body chunk goes out, so by the time a
    client holds a complete answer, the stats already include it (tests read them right away).
    """

    def __init__(self, app: ASGIApp, stats: EmulatorStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _GENERATION_RE.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        status, finished = 500, False

        def finish() -> None:
            nonlocal finished
            if not finished:
                finished = True
                self.stats.record_finish(status)

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finish()
            await send(message)

        self.stats.record_start()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            finish()


async def _client_stayed(request: Request, seconds: float) -> bool:
    """Wait `seconds`, or less if the client hangs up (then a timed-out client frees its slot)."""
    if seconds <= 0:
        return True
    try:
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return True
    return False


def _generation_key(gen: _Generation, seed: int, mode: Mode) -> tuple[Any, ...]:
    return (
        gen.model,
        gen.prompt,
        seed,
        gen.aspect_ratio,
        gen.num_inference_steps,
        gen.guidance_scale,
        gen.safety_check,
        mode,
    )


def _is_filtered(gen: _Generation, words: tuple[str, ...]) -> bool:
    lowered = gen.prompt.lower()
    return gen.safety_check and any(word.lower() in lowered for word in words if word)


@dataclass(frozen=True)
class _Answer:
    """How to answer one admitted request: format, headers and the fault to inject, if any."""

    request_id: str
    mode: Mode
    quality: int
    seed: int
    limit_headers: dict[str, str]
    fault: str | None


def _image_response(data: bytes, answer: _Answer, finish: str) -> Response:
    headers = {"x-request-id": answer.request_id, **answer.limit_headers}
    if answer.mode == "json":
        data_uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        document = {
            "id": answer.request_id,
            "base64": [data_uri],
            "finishReason": finish,
            "seed": answer.seed,
        }
        body, media_type = json.dumps(document).encode(), "application/json"
    else:
        headers = {"Seed": str(answer.seed), "Finish-Reason": finish, **headers}
        body, media_type = data, _CONTENT_TYPES[answer.mode]
    response_cls = _DroppedResponse if answer.fault == "drop" else Response
    return response_cls(body, media_type=media_type, headers=headers)


async def _validated(request: Request, config: EmulatorConfig) -> _Generation:
    """Checks in the API's order: key, then model, then body."""
    _check_auth(request.headers.get("authorization"), config.api_key)
    model = request.path_params["model"]
    if model not in MODELS:
        raise _ApiError(404, f"Model not found, inaccessible, and/or not deployed: {model}")
    return _parse_generation(await request.body(), model)


def _raise_forced_status(markers: _Markers, config: EmulatorConfig) -> None:
    if markers.status is not None:
        extra = _retry_after_headers(config) if markers.status == 429 else {}
        raise _ApiError(markers.status, headers=extra)


async def _answer(state: _EmulatorState, gen: _Generation, answer: _Answer) -> Response:
    """Produce (and bill) the image, then apply the requested delivery fault."""
    if answer.fault == "html":
        return HTMLResponse(_HTML_PAGE, headers={"x-request-id": answer.request_id})
    if answer.fault == "json-no-images":
        body = {
            "id": answer.request_id,
            "base64": [],
            "finishReason": "SUCCESS",
            "seed": answer.seed,
        }
        return JSONResponse(body, headers={"x-request-id": answer.request_id})
    filtered = _is_filtered(gen, state.config.filter_words)
    data = await anyio.to_thread.run_sync(
        _image_bytes, gen, answer.seed, answer.mode, answer.quality, filtered, state.config.image_kb
    )
    state.stats.record_generation(_generation_key(gen, answer.seed, answer.mode))
    if answer.fault == "truncate":
        data = data[: len(data) // 2]
    elif answer.fault == "garbage":
        data = _garbage()
    return _image_response(data, answer, "CONTENT_FILTERED" if filtered else "SUCCESS")


async def _generate(request: Request, state: _EmulatorState, request_id: str) -> Response:
    config = state.config
    gen = await _validated(request, config)
    markers = _parse_markers(gen.prompt)
    _raise_forced_status(markers, config)
    limit_headers = state.admit(gen, markers)
    answer = _Answer(
        request_id=request_id,
        mode=negotiate(request.headers.get("accept")),
        quality=_jpeg_quality(request.headers.get("jpeg-quality")),
        seed=gen.seed or secrets.randbelow(MAX_SEED) + 1,
        limit_headers=limit_headers,
        fault=markers.mode,
    )
    delay = config.latency_s + random.uniform(0, config.jitter_s) + markers.slow_s
    if not await _client_stayed(request, delay):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return await _answer(state, gen, answer)


def _check_kontext_model(request: Request, config: EmulatorConfig) -> str:
    """Key first, then model, as on the generation route."""
    _check_auth(request.headers.get("authorization"), config.api_key)
    model = request.path_params["model"]
    if model not in KONTEXT_MODELS:
        raise _ApiError(404, f"Model not found, inaccessible, and/or not deployed: {model}")
    return model


async def _kontext_submit(request: Request, state: _EmulatorState, request_id: str) -> Response:
    config = state.config
    model = _check_kontext_model(request, config)
    # Decoding a multi-megabyte data URI is CPU work: keep it off the event loop.
    job, input_bytes = await anyio.to_thread.run_sync(_parse_kontext, await request.body(), model)
    markers = _parse_markers(job.prompt)
    _raise_forced_status(markers, config)
    limit_headers = state.admit(job, markers)
    origin = config.kontext_results_url or str(request.base_url)
    task = _KontextTask(
        id=request_id,
        job=job,
        seed=job.seed or secrets.randbelow(MAX_SEED) + 1,
        markers=markers,
        created=_now(),
        results_origin=origin.rstrip("/"),
        input_bytes=input_bytes,
    )
    state.add_task(task)
    headers = {"x-request-id": request_id, **limit_headers}
    return JSONResponse({"request_id": task.id}, headers=headers)


async def _kontext_poll(request: Request, state: _EmulatorState) -> Response:
    model = _check_kontext_model(request, state.config)
    body = _json_object(await request.body())
    task_id = body.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise _ApiError(400, "id is required: the request_id the submit answered", param="id")
    return JSONResponse(state.poll(model, task_id))


async def _kontext_result(request: Request, state: _EmulatorState) -> Response:
    """A result download: no key needed (a signed URL in real life); who sent one is counted."""
    task = state.ready_task(request.path_params["name"])
    if task is None:
        raise _ApiError(404, "No such result (unknown, not ready, or expired)")
    state.stats.record_download(with_auth="authorization" in request.headers)
    if task.image is None:
        task.image = await anyio.to_thread.run_sync(_kontext_image_bytes, task)
        task.input_bytes = None
    return Response(task.image, media_type=_CONTENT_TYPES[task.job.output_format])


def _config_changes(raw: bytes) -> dict[str, Any]:
    try:
        changes = json.loads(raw or b"{}")
    except ValueError:
        raise _ApiError(400, "body must be a JSON object of settings") from None
    if not isinstance(changes, dict):
        raise _ApiError(400, "body must be a JSON object of settings")
    if isinstance(changes.get("filter_words"), list):
        changes["filter_words"] = tuple(changes["filter_words"])
    return changes


def create_app(config: EmulatorConfig, stats: EmulatorStats) -> Starlette:
    """The ASGI app alone, for embedding in another server or an in-process ASGI transport."""
    state = _EmulatorState(config, stats)

    async def generation(request: Request) -> Response:
        request_id = _new_request_id()
        try:
            return await _generate(request, state, request_id)
        except _ApiError as error:
            return _error_response(error, request_id)

    async def kontext_submit(request: Request) -> Response:
        request_id = _new_request_id()
        try:
            return await _kontext_submit(request, state, request_id)
        except _ApiError as error:
            return _error_response(error, request_id)

    async def kontext_poll(request: Request) -> Response:
        try:
            return await _kontext_poll(request, state)
        except _ApiError as error:
            return _error_response(error, _new_request_id())

    async def kontext_result(request: Request) -> Response:
        try:
            return await _kontext_result(request, state)
        except _ApiError as error:
            return _error_response(error, _new_request_id())

    async def read_stats(request: Request) -> Response:
        return JSONResponse(stats.as_dict())

    async def read_config(request: Request) -> Response:
        return JSONResponse(config.public_dict())

    async def change_config(request: Request) -> Response:
        try:
            state.configure(_config_changes(await request.body()))
        except _ApiError as error:
            return _error_response(error, _new_request_id())
        except (TypeError, ValueError) as error:
            return _error_response(_ApiError(400, str(error)), _new_request_id())
        return JSONResponse(config.public_dict())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse(stats.as_dict())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = (
            f"No route for {request.method} {request.url.path}"
            if exc.status_code == 404
            else f"Method {request.method} is not allowed on {request.url.path}"
        )
        error = _ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
        return _error_response(error, _new_request_id())

    app = Starlette(
        routes=[
            Route(GENERATION_PATH, generation, methods=["POST"]),
            Route(KONTEXT_SUBMIT_PATH, kontext_submit, methods=["POST"]),
            Route(KONTEXT_RESULT_PATH, kontext_poll, methods=["POST"]),
            Route(RESULTS_PATH, kontext_result, methods=["GET"]),
            Route("/_emulator/stats", read_stats, methods=["GET"]),
            Route("/_emulator/config", read_config, methods=["GET"]),
            Route("/_emulator/config", change_config, methods=["POST"]),
            Route("/_emulator/reset", reset, methods=["POST"]),
        ],
        middleware=[Middleware(_Meter, stats=stats)],
        exception_handlers={404: http_error, 405: http_error},
    )
    app.router.redirect_slashes = False  # the real API answers 404, not a redirect
    app.state.emulator = state
    return app


# --------------------------------------------------------------------------------------------
# Serving on loopback
# --------------------------------------------------------------------------------------------


def _loopback_address(host: str) -> str:
    """Refuse anything but loopback: with api_key=None this server would accept any key."""
    if host.strip().lower() == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"the emulator binds to loopback only (127.0.0.1, ::1 or localhost); got {host!r}"
        )
    return str(address)


def _bind(host: str, port: int) -> socket.socket:
    """Bound and listening before the server starts, so callers know the port at once.

    IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say so, and without it
    every keep-alive answer stalls ~40 ms on Nagle + delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


def _origin(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        http="h11",
        ws="none",
        loop="asyncio",
        server_header=False,
        timeout_graceful_shutdown=1,
    )
    _install_log_filter()
    return config


class _ThreadedServer(uvicorn.Server):
    """A uvicorn server that another thread can wait for, and stop without waiting for a tick.

    uvicorn polls `should_exit` every 0.1 s; waking the loop at once halves the cost of a stop,
    which the test suite pays once per test using the `emulator` fixture.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        await super().startup(sockets=sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            assert self._wake is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def request_exit(self) -> None:
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(wake.set)


class Emulator:
    """The emulator on a loopback port, in a background thread; use as a context manager.

    The socket is bound before the server thread starts, so port 0 works and `base_url` is known
    when `start()` returns. Each instance has its own app, state, thread and event loop, so several
    can run in one process.
    """

    def __init__(
        self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._host = _loopback_address(host)
        self._requested_port = port
        self.config = config if config is not None else EmulatorConfig()
        self.stats = EmulatorStats()
        self.app = create_app(self.config, self.stats)
        self._state: _EmulatorState = self.app.state.emulator
        self._port: int | None = None
        self._server: _ThreadedServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = _origin(self._host, self._port) if self._port else "not started"
        return f"Emulator({where}, {self.config!r})"

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the emulator has no address until start() is called")
        return _origin(self._host, self._port)

    @property
    def base_url(self) -> str:
        return self.url + API_PREFIX

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the emulator has no port until start() is called")
        return self._port

    def start(self, timeout: float = 10.0) -> Emulator:
        if self._thread is not None:
            return self
        sock = _bind(self._host, self._requested_port)
        self._port = int(sock.getsockname()[1])
        server = _ThreadedServer(_uvicorn_config(self.app, self._host, self._port))
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"flux-emulator-{self._port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        deadline = time.monotonic() + timeout
        while not server.ready.wait(0.05):
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"the emulator did not start on {self.url}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let running requests finish (up to 1 s), then end the thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.request_exit()
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def configure(self, **changes: Any) -> None:
        """Change settings while running; all-or-nothing, and a new fault_seed restarts the RNG."""
        self._state.configure(changes)

    def reset_stats(self) -> None:
        """Zero the counters (flaky memory and the rate window are kept: see `reset`)."""
        self.stats.reset()

    def reset(self) -> None:
        """A fresh emulator without restarting: counters, flaky memory, rate window, fault RNG."""
        self._state.reset()


def serve(host: str = "127.0.0.1", port: int = 8000, config: EmulatorConfig | None = None) -> None:
    """Run the emulator in the foreground until Ctrl-C or SIGTERM (the CLI's `emulator` command)."""
    bind_host = _loopback_address(host)
    app = create_app(config if config is not None else EmulatorConfig(), EmulatorStats())
    sock = _bind(bind_host, port)
    actual_port = int(sock.getsockname()[1])
    server = uvicorn.Server(_uvicorn_config(app, bind_host, actual_port))
    base_url = _origin(bind_host, actual_port) + API_PREFIX
    print(
        f"Fireworks emulator listening: FIREWORKS_BASE_URL={base_url}",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
