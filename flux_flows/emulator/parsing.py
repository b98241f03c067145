"""Reading a request as the real API does: the key, the body of a generation or a Kontext submit
(defaults for absent fields, unknown ones ignored, the API's messages for bad ones) and the
`Accept` and `Jpeg-Quality` headers. Anything wrong becomes an `ApiError` before any work is done.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, cast

from PIL import Image

from flux_flows.emulator.config import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_GUIDANCE,
    DEFAULT_JPEG_QUALITY,
    KONTEXT_DEFAULT_SAFETY_TOLERANCE,
    KONTEXT_MAX_BODY_BYTES,
    MAX_BODY_BYTES,
    Mode,
)
from flux_flows.emulator.errors import INVALID_KEY_MESSAGE, ApiError
from flux_flows.models import (
    ASPECT_RATIO_SIZES,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_SAFETY_TOLERANCE,
    MAX_SEED,
    MAX_STEPS,
)


@dataclass(frozen=True)
class ParsedRequest:
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


def json_object(raw: bytes, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    if len(raw) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _prompt(body: dict[str, Any]) -> str:
    value = body.get("prompt")
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "prompt is required and must be a non-empty string", param="prompt")
    return value


def _aspect_ratio(body: dict[str, Any]) -> str:
    value = body.get("aspect_ratio")
    if value is None:
        return DEFAULT_ASPECT_RATIO
    if not isinstance(value, str) or value not in ASPECT_RATIO_SIZES:
        allowed = ", ".join(ASPECT_RATIO_SIZES)
        raise ApiError(
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
        raise ApiError(
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
        raise ApiError(
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
        raise ApiError(
            400,
            f"safety_check must be true or false; got {_short_repr(value)}",
            param="safety_check",
        )
    return value


def parse_generation(raw: bytes, model: str) -> ParsedRequest:
    """Validate like the API: defaults for absent or null fields, unknown fields ignored."""
    body = json_object(raw)
    return ParsedRequest(
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
class KontextJob:
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
        raise ApiError(
            400, "input_image must be a base64 data URI or an http(s) URL", param="input_image"
        )
    if value.startswith(("http://", "https://")):
        return hashlib.sha256(value.encode()).hexdigest(), None
    header, sep, payload = value.partition(",")
    if not (value.startswith("data:image/") and sep and header.endswith(";base64")):
        raise ApiError(
            400,
            "input_image must be a base64 data URI (data:image/...;base64,...) or an http(s) URL",
            param="input_image",
        )
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
    except (ValueError, OSError):
        raise ApiError(400, "input_image is not a decodable image", param="input_image") from None
    return hashlib.sha256(data).hexdigest(), data


def parse_kontext(raw: bytes, model: str) -> tuple[KontextJob, bytes | None]:
    """Validate a Kontext submit like the API: defaults for absent fields, unknown ones ignored.

    Returns the job and the decoded input image (kept by the task only until it is rendered).
    """
    body = json_object(raw, KONTEXT_MAX_BODY_BYTES)
    prompt = _prompt(body)
    output_format = body.get("output_format")
    if output_format is None:
        output_format = "jpeg"
    if output_format not in ("jpeg", "png"):
        raise ApiError(
            400,
            f"output_format must be jpeg or png; got {_short_repr(output_format)}",
            param="output_format",
        )
    upsampling = body.get("prompt_upsampling")
    if upsampling is not None and not isinstance(upsampling, bool):
        raise ApiError(
            400,
            f"prompt_upsampling must be true or false; got {_short_repr(upsampling)}",
            param="prompt_upsampling",
        )
    input_hash, input_bytes = _kontext_input(body)
    job = KontextJob(
        model=model,
        prompt=prompt,
        seed=_bounded_int(body, "seed", 0, MAX_SEED, 0, " (0 picks a random seed)"),
        aspect_ratio=_aspect_ratio(body),
        output_format=cast(Literal["jpeg", "png"], output_format),  # checked above
        safety_tolerance=_bounded_int(
            body, "safety_tolerance", 0, MAX_SAFETY_TOLERANCE, KONTEXT_DEFAULT_SAFETY_TOLERANCE, ""
        ),
        prompt_upsampling=bool(upsampling),
        input_hash=input_hash,
    )
    return job, input_bytes


def check_auth(header: str | None, expected: str | None) -> None:
    """Constant-time compare; the same message whatever went wrong, and never the key itself."""
    scheme, _, key = (header or "").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or any(ch.isspace() for ch in key):
        raise ApiError(401, INVALID_KEY_MESSAGE)
    if expected is not None and not hmac.compare_digest(key.encode(), expected.encode()):
        raise ApiError(401, INVALID_KEY_MESSAGE)


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


def jpeg_quality(header: str | None) -> int:
    """Honour `Jpeg-Quality` when it is an integer 0-100; otherwise ignore it, leniently."""
    try:
        quality = int((header or "").strip())
    except ValueError:
        return DEFAULT_JPEG_QUALITY
    return quality if 0 <= quality <= 100 else DEFAULT_JPEG_QUALITY
