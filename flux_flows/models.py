"""The contract as data: what a generation request may contain, what comes back, what a run records.

Everything that decides *which pixels* an image has lives in `ImageRequest`, so its `cache_key` is
the single identity used by Prefect's cache, by storage object keys and by batch de-duplication.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)

SCHNELL = "flux-1-schnell-fp8"
DEV = "flux-1-dev-fp8"
ModelName = Literal["flux-1-schnell-fp8", "flux-1-dev-fp8"]
MODELS: tuple[str, ...] = (SCHNELL, DEV)

AspectRatio = Literal[
    "1:1", "21:9", "16:9", "3:2", "5:4", "4:5", "2:3", "9:16", "9:21", "4:3", "3:4"
]
# Sizes from the published list of supported resolutions; 5:4 and 4:5 are not listed there, so
# these two are our choice (see shared/fireworks-api.md).
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
MAX_SEED = 2**32 - 1
_DERIVED_SEED_SPAN = 2**31 - 1
# Bumped only when the meaning of a cache key changes, so old keys never alias new images.
CACHE_KEY_VERSION = 1


class FinishReason(StrEnum):
    """How one requested image ended. The API sends the first two; the library adds the rest."""

    SUCCESS = "SUCCESS"
    CONTENT_FILTERED = "CONTENT_FILTERED"
    ERROR = "ERROR"
    SKIPPED_BUDGET = "SKIPPED_BUDGET"
    PLANNED = "PLANNED"  # dry runs only: would be generated


def derive_seed(base_seed: int | None, prompt: str, variant: int = 0) -> int:
    """A seed that depends only on its inputs, so a re-run sends exactly the same requests.

    Hashing (rather than `base_seed + variant`) keeps variants of neighbouring base seeds from
    overlapping. The result is never 0, which the API would read as "pick one at random".
    """
    payload = json.dumps([base_seed, prompt, variant], ensure_ascii=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % _DERIVED_SEED_SPAN + 1


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field, for CLI output and batch pre-flight errors."""
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "request"
        message = error["msg"].removeprefix("Value error, ")
        got = error.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{field}: {message}{shown}")
    return "; ".join(lines)


class ImageRequest(BaseModel):
    """One text-to-image generation, validated against the published contract before any spend."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    prompt: Annotated[str, Field(min_length=1, max_length=10_000)]
    model: ModelName = SCHNELL
    aspect_ratio: AspectRatio = "1:1"
    guidance_scale: Annotated[float, Field(gt=MIN_GUIDANCE_EXCLUSIVE, le=MAX_GUIDANCE)] = 3.5
    num_inference_steps: Annotated[int, Field(ge=1, le=50)] = DEFAULT_STEPS[SCHNELL]
    seed: Annotated[int, Field(ge=1, le=MAX_SEED)] = 1
    safety_check: bool = False
    output_format: OutputFormat = "jpeg"

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
        for key in ("guidance_scale",):
            if data.get(key) is None:
                data.pop(key, None)
        return data

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
        """
        payload = {
            "v": CACHE_KEY_VERSION,
            **self.api_body(),
            "model": self.model,
            "output_format": self.output_format,
        }
        canonical = json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]

    def api_body(self) -> dict[str, Any]:
        """The JSON body the text_to_image endpoint takes (model and format travel elsewhere)."""
        return {
            "prompt": self.prompt,
            "aspect_ratio": self.aspect_ratio,
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
            "seed": self.seed,
            "safety_check": self.safety_check,
        }


class GeneratedImage(BaseModel):
    """One answer of the API. Holds the bytes: keep it short-lived, carry `ImageRecord`s instead."""

    model_config = ConfigDict(frozen=True)

    request: ImageRequest
    data: bytes = Field(repr=False)
    content_type: str
    seed: int | None
    finish_reason: FinishReason
    request_id: str | None = None
    latency_s: float = 0.0
    width: int
    height: int
    attempts: int = Field(default=1, description="HTTP requests it took, retries included")
    throttled: int = Field(default=0, description="how many of those were answered 429")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def size_bytes(self) -> int:
        return len(self.data)


class ImageRecord(BaseModel):
    """One line of the manifest: what was asked, how it ended, where it is. Never the bytes."""

    model_config = ConfigDict(extra="ignore")

    index: int = Field(description="position of the prompt in the input")
    variant: int = 0
    prompt: str
    model: str
    aspect_ratio: str
    guidance_scale: float
    num_inference_steps: int
    seed: int
    safety_check: bool
    output_format: str
    cache_key: str
    finish_reason: FinishReason
    item_id: str | None = Field(default=None, description="the user's id for the prompt row")
    uri: str | None = Field(
        default=None, description="where the real image is; None unless SUCCESS"
    )
    filtered_uri: str | None = Field(default=None, description="a CONTENT_FILTERED answer's bytes")
    thumbnail_uri: str | None = None
    cached: bool = False
    error: str | None = None
    spill_path: str | None = None
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    size_bytes: int | None = None
    request_id: str | None = None
    latency_s: float | None = None
    api_calls: int = 0
    estimated_cost_usd: float = 0.0

    @classmethod
    def for_request(
        cls, request: ImageRequest, *, index: int, variant: int, **fields: Any
    ) -> ImageRecord:
        return cls(
            index=index,
            variant=variant,
            cache_key=request.cache_key,
            **request.model_dump(),
            **fields,
        )

    def to_request(self) -> ImageRequest:
        """The exact request that produced (or should produce) this record, for replays."""
        return ImageRequest(
            prompt=self.prompt,
            model=self.model,
            aspect_ratio=self.aspect_ratio,
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps,
            seed=self.seed,
            safety_check=self.safety_check,
            output_format=self.output_format,
        )


class BatchReport(BaseModel):
    """What a batch run returns: every record, counts by outcome, and what the run cost."""

    records: list[ImageRecord]
    counts: dict[str, int]
    api_calls: int
    cache_hits: int
    manifest_uri: str | None
    destination: str
    contact_sheet_uri: str | None = None
    spill_dir: str | None = None
    estimated_cost_usd: float = 0.0
    saved_usd: float = 0.0
    wall_time_s: float = 0.0
    dry_run: bool = False

    @property
    def failed(self) -> int:
        return self.counts.get(FinishReason.ERROR, 0)

    @property
    def spilled(self) -> int:
        return sum(1 for r in self.records if r.spill_path)


PIXEL_FIELDS = (
    "model",
    "aspect_ratio",
    "guidance_scale",
    "num_inference_steps",
    "seed",
    "safety_check",
    "output_format",
)


def request_for(
    prompt: str | Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    base_seed: int | None = None,
    variant: int = 0,
) -> ImageRequest:
    """The request for one prompt (string or dict of overrides) and variant, always seeded.

    Precedence: the prompt's own overrides, then `defaults` (a batch's settings). The seed is the
    prompt's explicit seed for variant 0, else derived from (explicit seed or `base_seed`,
    prompt, variant), so K variants get K distinct, reproducible seeds.
    """
    fields: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if v is not None}
    if isinstance(prompt, str):
        fields["prompt"] = prompt
    else:
        fields.update({k: v for k, v in prompt.items() if v is not None and k != "id"})
    text = fields.get("prompt")
    own_seed = prompt.get("seed") if not isinstance(prompt, str) else None
    if isinstance(text, str):
        text = text.strip()
        if own_seed is not None and variant == 0:
            fields["seed"] = own_seed
        else:
            seed_base = int(own_seed) if own_seed is not None else base_seed
            fields["seed"] = derive_seed(seed_base, text, variant)
    return ImageRequest.model_validate(fields)
