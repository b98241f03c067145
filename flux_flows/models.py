"""The contract as data: what a generation request may contain, what comes back, what a run records.

Everything that decides *which pixels* an image has lives in `ImageRequest`, so its `cache_key` is
the single identity used by Prefect's cache, by storage object keys and by batch de-duplication.

Two families of models share `ImageRequest`: FLUX.1 (synchronous text_to_image) and FLUX Kontext
(asynchronous, optionally editing an input image). Each family has its own fields; a field of the
other family must stay at its default, so one request never silently means two things.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from flux_flows.inputs.images import (
    check_input_image,
    input_image_kind,
    normalize_reference,
    resolve_input_image,
    sha256_hex,
)
from flux_flows.seeds import MAX_SEED, derive_seed, step_seed

SCHNELL: Final = "flux-1-schnell-fp8"
DEV: Final = "flux-1-dev-fp8"
KONTEXT_PRO: Final = "flux-kontext-pro"
KONTEXT_MAX: Final = "flux-kontext-max"
ModelName = Literal["flux-1-schnell-fp8", "flux-1-dev-fp8", "flux-kontext-pro", "flux-kontext-max"]
# The synchronous text_to_image models (FLUX.1).
MODELS: tuple[str, ...] = (SCHNELL, DEV)
# The asynchronous models (submit, poll get_result, download the sample), which can edit images.
KONTEXT_MODELS: tuple[str, ...] = (KONTEXT_PRO, KONTEXT_MAX)
ALL_MODELS: tuple[str, ...] = (*MODELS, *KONTEXT_MODELS)
# Request fields only Kontext takes; a FLUX.1 request keeps them at their defaults.
KONTEXT_FIELDS: tuple[str, ...] = (
    "input_image",
    "input_image_sha256",
    "safety_tolerance",
    "prompt_upsampling",
)

AspectRatio = Literal[
    "1:1", "21:9", "16:9", "3:2", "5:4", "4:5", "2:3", "9:16", "9:21", "4:3", "3:4"
]
# Sizes from the published list of supported resolutions; 5:4 and 4:5 are not listed there, so
# these two are our choice (see docs/fireworks-api.md).
ASPECT_RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "21:9": (1536, 640),
    "16:9": (1344, 768),
    "3:2": (1216, 832),
    "5:4": (1120, 896),
    "4:5": (896, 1120),
    "2:3": (832, 1216),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
    "4:3": (1152, 896),
    "3:4": (896, 1152),
}
OutputFormat = Literal["jpeg", "png"]
CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png"}

DEFAULT_STEPS: dict[str, int] = {SCHNELL: 4, DEV: 28}
MAX_STEPS: dict[str, int] = {SCHNELL: 12, DEV: 50}
MIN_GUIDANCE_EXCLUSIVE = 0.0
MAX_GUIDANCE = 20.0
# Seed 0 asks the API for a random seed; every seed we send is in 1..MAX_SEED so it is reproducible.
# Bumped only when the meaning of a cache key changes, so old keys never alias new images.
CACHE_KEY_VERSION = 1
DEFAULT_GUIDANCE = 3.5
DEFAULT_SAFETY_TOLERANCE = 2
MAX_SAFETY_TOLERANCE = 6
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_SHOWN_INPUT_CHARS = 80


def is_kontext(model: str) -> bool:
    """True for the asynchronous FLUX Kontext models."""
    return model in KONTEXT_MODELS


class FinishReason(StrEnum):
    """How one requested image ended. The API sends the first two; the library adds the rest."""

    SUCCESS = "SUCCESS"
    CONTENT_FILTERED = "CONTENT_FILTERED"
    ERROR = "ERROR"
    SKIPPED_BUDGET = "SKIPPED_BUDGET"
    PLANNED = "PLANNED"  # dry runs only: would be generated


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field, for CLI output and batch pre-flight errors."""
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "request"
        message = error["msg"].removeprefix("Value error, ")
        got = error.get("input")
        text = repr(got)
        # An input image may be a multi-megabyte data URI: show its start, not all of it.
        if len(text) > _SHOWN_INPUT_CHARS:
            text = text[: _SHOWN_INPUT_CHARS - 4] + "...'"
        shown = "" if isinstance(got, dict) else f" (got {text})"
        lines.append(f"{field}: {message}{shown}")
    return "; ".join(lines)


class ImageRequest(BaseModel):
    """One generation, validated against the published contract before any spend.

    FLUX.1 models take `guidance_scale`, `num_inference_steps` and `safety_check`; FLUX Kontext
    models take `input_image` (an edit), `safety_tolerance` and `prompt_upsampling`. A field of
    the other family must keep its default: the API would ignore it, and a request that says one
    thing while producing another would poison the cache.

    `input_image` is a reference (local path, `s3://bucket/key`, `http(s)://` URL or data URI),
    never the bytes. `input_image_sha256` is the SHA-256 of those bytes, filled here for local
    files and data URIs and by the batch (`images_in.hash_input_images`) for S3 objects and URLs;
    it, not the reference, goes into the cache key, so a renamed photo is not paid for twice.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    prompt: Annotated[str, Field(min_length=1, max_length=10_000)]
    model: ModelName = SCHNELL
    aspect_ratio: AspectRatio = "1:1"
    guidance_scale: Annotated[float, Field(gt=MIN_GUIDANCE_EXCLUSIVE, le=MAX_GUIDANCE)] = (
        DEFAULT_GUIDANCE
    )
    num_inference_steps: Annotated[int, Field(ge=1, le=50)] = DEFAULT_STEPS[SCHNELL]
    seed: Annotated[int, Field(ge=1, le=MAX_SEED)] = 1
    safety_check: bool = False
    output_format: OutputFormat = "jpeg"
    input_image: str | None = None
    input_image_sha256: Annotated[str | None, Field(validate_default=True)] = None
    safety_tolerance: Annotated[int, Field(ge=0, le=MAX_SAFETY_TOLERANCE)] = (
        DEFAULT_SAFETY_TOLERANCE
    )
    prompt_upsampling: bool = False

    @model_validator(mode="before")
    @classmethod
    def _fill_model_dependent_defaults(cls, data: Any) -> Any:
        """Steps default per model, and a missing seed is derived from the prompt (never random)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        model = data.get("model") or SCHNELL
        if data.get("num_inference_steps") is None and model in DEFAULT_STEPS:
            data["num_inference_steps"] = DEFAULT_STEPS[model]
        if data.get("seed") is None:
            prompt = data.get("prompt")
            if isinstance(prompt, str) and prompt.strip():
                data["seed"] = derive_seed(None, prompt.strip(), 0)
        for key in ("guidance_scale", "num_inference_steps", "safety_tolerance"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @field_validator(
        "seed", "num_inference_steps", "guidance_scale", "safety_tolerance", mode="before"
    )
    @classmethod
    def _reject_booleans(cls, value: Any) -> Any:
        """JSON true/false are not numbers: pydantic would read true as 1, the API refuses it."""
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _reject_random_seed(cls, value: Any) -> Any:
        if value == 0 or value == "0":
            raise ValueError(
                "seed 0 asks the API for a random seed, which can be neither reproduced nor "
                "cached; omit the seed to get a stable one derived from the prompt"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _reject_control_characters(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("prompt contains a NUL character")
        return value

    @field_validator("num_inference_steps")
    @classmethod
    def _steps_within_model_range(cls, value: int, info: ValidationInfo) -> int:
        model = info.data.get("model")
        limit = MAX_STEPS.get(model, 50) if isinstance(model, str) else 50
        if value > limit:
            raise ValueError(f"{model} takes at most {limit} steps (allowed: 1..{limit})")
        return value

    @field_validator("guidance_scale", "num_inference_steps", "safety_check")
    @classmethod
    def _flux1_only(cls, value: Any, info: ValidationInfo) -> Any:
        """Kontext has no steps, guidance or safety_check: a non-default value would be ignored."""
        model = info.data.get("model")
        if isinstance(model, str) and is_kontext(model):
            default = cls.model_fields[str(info.field_name)].default
            if value != default:
                hint = (
                    "; use safety_tolerance (0 strict .. 6 permissive)"
                    if info.field_name == "safety_check"
                    else ""
                )
                raise ValueError(
                    f"{model} does not take {info.field_name}; leave it unset "
                    f"(default {default!r}){hint}"
                )
        return value

    @field_validator("safety_tolerance", "prompt_upsampling")
    @classmethod
    def _kontext_only(cls, value: Any, info: ValidationInfo) -> Any:
        model = info.data.get("model")
        default = cls.model_fields[str(info.field_name)].default
        if isinstance(model, str) and not is_kontext(model) and value != default:
            raise ValueError(
                f"only the FLUX Kontext models ({', '.join(KONTEXT_MODELS)}) take "
                f"{info.field_name}; {model} does not"
            )
        return value

    @field_validator("input_image")
    @classmethod
    def _input_image_reference(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Kontext only; local paths made absolute, so a worker elsewhere reads the same file."""
        if value is None:
            return None
        model = info.data.get("model")
        if isinstance(model, str) and not is_kontext(model):
            raise ValueError(
                f"{model} cannot edit an image; use {' or '.join(KONTEXT_MODELS)} with input_image"
            )
        ref = normalize_reference(value)
        check_input_image(ref)  # a missing or non-image file is named here, before any spend
        return ref

    @field_validator("input_image_sha256")
    @classmethod
    def _content_hash(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Hash local files and data URIs now; S3 objects and URLs are hashed by the batch."""
        ref = info.data.get("input_image")
        if value is not None:
            value = value.lower()
            if not _SHA256_HEX.match(value):
                raise ValueError("must be 64 hexadecimal characters (a SHA-256 digest)")
            if ref is None and "input_image" in info.data:
                raise ValueError("given without input_image")
            return value
        if not isinstance(ref, str):
            return None
        if input_image_kind(ref) not in ("path", "data"):
            return None
        data, _ = resolve_input_image(ref)
        return sha256_hex(data)

    @model_serializer(mode="wrap")
    def _flux1_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A FLUX.1 request serializes exactly as before Kontext existed.

        Its Kontext fields are always at their defaults (validation sees to it), so leaving them
        out loses nothing, and keeps Prefect parameters, prompt rows and stored task results of
        FLUX.1 requests unchanged.
        """
        data: dict[str, Any] = handler(self)
        if not self.is_kontext:
            for name in KONTEXT_FIELDS:
                data.pop(name, None)
        return data

    @property
    def is_kontext(self) -> bool:
        return is_kontext(self.model)

    @property
    def needs_input_hash(self) -> bool:
        """An S3 or URL input not read yet: the cache key (content-based) is not known until it is.

        Fill it with `images_in.hash_input_images` (the batch does) before asking for `cache_key`.
        """
        return self.input_image is not None and self.input_image_sha256 is None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) the API renders for this aspect ratio."""
        return ASPECT_RATIO_SIZES[self.aspect_ratio]

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]

    @property
    def cache_key(self) -> str:
        """Identity of the pixels: same fields -> same key, on any machine and Python version.

        Canonical JSON (sorted keys, ASCII, shortest float repr) of every field that changes the
        image, plus a version, hashed with SHA-256. 32 hex characters keep object keys short while
        leaving collisions out of reach (128 bits).

        FLUX.1 keys are exactly what they were before Kontext existed (images already stored stay
        found). Kontext keys hold the Kontext fields and the input image's *content* hash, never
        its name, and no FLUX.1-only field; the model name keeps the two families apart.
        """
        if self.is_kontext:
            if self.needs_input_hash:
                raise ValueError(
                    f"input_image {self.input_image!r} has not been read yet, so the cache key "
                    "(which depends on the image's content) is unknown; hash it first with "
                    "flux_flows.inputs.images.hash_input_images (the batch flows do this)"
                )
            payload: dict[str, Any] = {
                "v": CACHE_KEY_VERSION,
                "model": self.model,
                "prompt": self.prompt,
                "aspect_ratio": self.aspect_ratio,
                "seed": self.seed,
                "output_format": self.output_format,
                "input_image_sha256": self.input_image_sha256,
                "safety_tolerance": self.safety_tolerance,
                "prompt_upsampling": self.prompt_upsampling,
            }
        else:
            payload = {
                "v": CACHE_KEY_VERSION,
                **self.api_body(),
                "model": self.model,
                "output_format": self.output_format,
            }
        canonical = json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]

    def api_body(self, *, input_data_uri: str | None = None) -> dict[str, Any]:
        """The JSON body the model's endpoint takes (for FLUX.1, model and format travel elsewhere).

        FLUX.1: the text_to_image body. Kontext: the submit body; an edit's image goes in as the
        data URI the client builds at send time (`input_data_uri`), so no request ever holds
        image bytes.
        """
        if not self.is_kontext:
            return {
                "prompt": self.prompt,
                "aspect_ratio": self.aspect_ratio,
                "guidance_scale": self.guidance_scale,
                "num_inference_steps": self.num_inference_steps,
                "seed": self.seed,
                "safety_check": self.safety_check,
            }
        body: dict[str, Any] = {
            "prompt": self.prompt,
            "seed": self.seed,
            "aspect_ratio": self.aspect_ratio,
            "output_format": self.output_format,
            "prompt_upsampling": self.prompt_upsampling,
            "safety_tolerance": self.safety_tolerance,
        }
        if self.input_image is not None:
            if input_data_uri is None:
                raise ValueError(
                    "this request edits an image: pass input_data_uri (the client reads the "
                    "image at send time)"
                )
            body["input_image"] = input_data_uri
        return body


def request_for(
    prompt: str | Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    seed: int | None = None,
    base_seed: int | None = None,
    variant: int = 0,
) -> ImageRequest:
    """The request for one prompt (string or dict of overrides) and variant, always seeded.

    Precedence: the prompt's own overrides, then `defaults` (a batch's settings). The seed
    follows the one rule of `flux_flows.seeds`: a given seed (the prompt's own, else `seed`) is
    sent as is for variant 0 and variant v gets seed + v (wrapping within 1..2^32-1); without
    one it is derived from (`base_seed`, prompt, variant), so K variants get K distinct,
    reproducible seeds.
    """
    fields: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if v is not None}
    fields.pop("seed", None)
    if isinstance(prompt, str):
        fields["prompt"] = prompt
    else:
        fields.update({k: v for k, v in prompt.items() if v is not None and k != "id"})
    text = fields.get("prompt")
    own_seed = fields.pop("seed", None)
    given = own_seed if own_seed is not None else seed
    if given is not None and variant == 0:
        fields["seed"] = given  # validated as given: a bad seed is named, not crashed on
    elif given is not None:
        fields["seed"] = _stepped(given, variant)
    elif isinstance(text, str):
        fields["seed"] = derive_seed(base_seed, text.strip(), variant)
    return ImageRequest.model_validate(fields)


def _stepped(seed: Any, variant: int) -> Any:
    """Variant `variant` of a given seed; a seed that is no valid number is passed on as is,
    for the request's validation to name it."""
    try:
        number = int(seed)
    except (TypeError, ValueError):
        return seed
    if isinstance(seed, bool) or (number != seed and not isinstance(seed, str)):
        return seed  # True, 7.5: not a seed
    if not 1 <= number <= MAX_SEED:
        return seed
    return step_seed(number, variant)
