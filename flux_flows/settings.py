"""The one list of knobs: a batch's request defaults and how it runs.

The flows' signatures, the CLI's `run` and `plan`, `replay_failed` and `build_request` all take
these settings; their names, defaults and checks are written here once. Prefect still needs each
flow parameter spelled out in the flow's signature (that is what the UI shows and deployments
fill in), so a test holds the signatures to these models field by field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from flux_flows.models import DEFAULT_GUIDANCE, SCHNELL
from flux_flows.seeds import MAX_SEED

DEFAULT_DESTINATION = "./flux-flows-output"


def _number(name: str, value: Any) -> None:
    """Refuse what Python would take as a number but a user never means as one."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# field: (floor, floor allowed, what the message says)
_LOWER_BOUNDS: dict[str, tuple[float, bool, str]] = {
    "variants": (1, True, "must be at least 1"),
    "max_concurrency": (1, True, "must be at least 1"),
    "chunk_size": (1, True, "must be at least 1"),
    "requests_per_minute": (0, False, "must be positive"),
    "budget_usd": (0, True, "must not be negative"),
}


class RequestDefaults(BaseModel):
    """Batch-wide request fields; a prompt's own overrides win. None: the model's own default."""

    model_config = ConfigDict(frozen=True)

    model: str = SCHNELL
    aspect_ratio: str = "1:1"
    guidance_scale: float = DEFAULT_GUIDANCE
    num_inference_steps: int | None = None
    output_format: str = "jpeg"
    safety_check: bool = False
    safety_tolerance: int | None = None
    prompt_upsampling: bool | None = None

    def as_defaults(self) -> dict[str, Any]:
        """The fields a prompt's request starts from (see `models.request_for`)."""
        return {name: getattr(self, name) for name in REQUEST_FIELDS}


class BatchSettings(RequestDefaults):
    """How a batch runs: seeds, variants, limits, spend, where failed uploads wait."""

    # The seed rule (flux_flows/seeds.py): `seed` is sent as is for each prompt's variant 0, its
    # variants step from it (seed + 1, ...); `base_seed` derives each image's seed from
    # (base_seed, prompt, variant). Neither: derived from (prompt, variant). A row's seed wins.
    seed: int | None = None
    base_seed: int | None = None
    variants: int = 1
    max_concurrency: int = 8
    requests_per_minute: float | None = None
    dry_run: bool = False
    budget_usd: float | None = None
    prices: dict[str, float] | None = None
    spill_dir: str | None = None
    concurrency_limit: str | None = None
    # A Prefect global concurrency limit with slot decay: the account's requests per minute,
    # shared by every run and worker (`limits`); `requests_per_minute` paces this run alone.
    rate_limit: str | None = None
    fail_on_error: bool = False
    per_image_tasks: bool = False
    # A 256 px thumbnail per image for the contact sheet: ~4 ms of CPU and a second PUT per
    # image (`bench_batch.py --repeat 3`, benchmarks/RESULTS.md); without it the sheet shows the
    # full images.
    thumbnails: bool = True
    # Images per task run when a task runner other than local threads (Dask, Ray) runs the batch.
    chunk_size: int = 500
    # "render-chunk/<deployment>": chunks run as flow runs of that deployment, on its work pool.
    chunk_deployment: str | None = None
    # FLUX Kontext edit batch: a list of image references, or a folder / s3:// prefix to list.
    input_images: list[str] | str | None = None
    # Prompts from table columns (`planning.templates`): "photo of a {name}" rendered per row, its
    # fields' defaults, and the columns carried into the manifest and the S3 metadata.
    prompt_template: str | None = None
    template_defaults: dict[str, str] | None = None
    keep_columns: list[str] | None = None
    # When the batch ends: a `flux-flows.batch.*` Prefect event and the manifest as an asset
    # (`records.events`), so the next job can start on a trigger instead of polling.
    events: bool = True

    @field_validator(*_LOWER_BOUNDS, mode="before")
    @classmethod
    def _in_range(cls, value: Any, info: ValidationInfo) -> Any:
        """Each number has a floor (the messages name it); None means "no limit" where allowed."""
        if value is None:
            return value
        name = info.field_name or ""
        _number(name, value)
        floor, allowed, says = _LOWER_BOUNDS[name]
        if isinstance(value, int | float) and (value < floor or (value == floor and not allowed)):
            raise ValueError(f"{name} {says}, got {value}")
        return value

    @field_validator("seed", "base_seed", mode="before")
    @classmethod
    def _a_seed(cls, value: Any, info: ValidationInfo) -> Any:
        """A seed is an integer; the one sent as is must be in the API's range."""
        if value is None:
            return value
        name = info.field_name or ""
        _number(name, value)
        if name == "seed" and value == 0:
            raise ValueError(
                "seed 0 asks the API for a random seed, which can be neither reproduced nor "
                "cached; omit the seed to get a stable one derived from the prompt"
            )
        if name == "seed" and isinstance(value, int | float) and not 1 <= value <= MAX_SEED:
            raise ValueError(f"seed must be in 1..{MAX_SEED} (0 would mean random)")
        return value

    @field_validator("base_seed")
    @classmethod
    def _one_kind_of_seed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("seed") is not None:
            raise ValueError(
                "give seed (sent as is) or base_seed (seeds derived from it), not both"
            )
        return value

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        """The settings among a flow's or command's parameters, by name; the rest is ignored."""
        return cls.model_validate({k: v for k, v in params.items() if k in cls.model_fields})


class BatchOptions(BatchSettings):
    """Everything a run needs besides its prompts: the settings, where, and with which keys.

    The credentials are Prefect blocks (`FireworksCredentials`, prefect-aws `AwsCredentials`);
    typed loosely here because this module sits below the modules that define them.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    destination: str = DEFAULT_DESTINATION
    credentials: Any = None
    aws_credentials: Any = None
    # A replay: the manifest whose records this run re-does; the destination's manifest stays
    # that whole manifest, with the new outcomes in place of the old.
    merge_into: str | None = None


REQUEST_FIELDS: tuple[str, ...] = tuple(RequestDefaults.model_fields)
SETTING_FIELDS: tuple[str, ...] = tuple(BatchSettings.model_fields)
BATCH_DEFAULTS = BatchSettings()


def seconds_from_env(name: str, default: float, *, minimum: float = 0.0) -> float:
    """A duration knob from the environment (leases, heartbeats): a positive, finite number of
    seconds, at least `minimum`; anything else (unset, empty, "abc", "0", "inf") is `default`."""
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    if not math.isfinite(value) or value <= 0:
        return default
    return max(minimum, value)
