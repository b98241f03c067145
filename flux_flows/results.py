"""What comes back and what a run records: an answer, a manifest line, a batch's report.

Kept apart from the request models (`models.py`): a request decides the pixels; these only say
what happened to it, and are never part of a cache key.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from flux_flows.models import DEFAULT_SAFETY_TOLERANCE, FinishReason, ImageRequest
from flux_flows.storage import iter_uri_lines

FIRST_ERRORS = 10  # failures a report carries for summaries; the manifest has them all


class GeneratedImage(BaseModel):
    """One answer of the API. Holds the bytes: keep it short-lived, carry `ImageRecord`s instead.

    A moderated Kontext task (`Request Moderated` / `Content Moderated`) comes back as
    CONTENT_FILTERED with `data=b""` and width/height 0: Kontext sends no image at all, and an
    invented placeholder could be mistaken for a real one. Stored, it is an empty object under
    `filtered/`, which is what lets a re-run know the outcome without asking (and paying) again.
    """

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
    from_cache: bool = Field(
        default=False,
        description="read back from Prefect's result cache (the `generate_image` task): this "
        "call made no API request; `attempts` are the first call's",
    )

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented way; mypy cannot see it
    @property
    def size_bytes(self) -> int:
        return len(self.data)

    def facts(self) -> dict[str, Any]:
        """What a record of this answer keeps: never the bytes, only what they were."""
        return {
            "finish_reason": self.finish_reason,
            "width": self.width,
            "height": self.height,
            "content_type": self.content_type,
            "size_bytes": self.size_bytes,
            "request_id": self.request_id,
            "latency_s": self.latency_s,
            "api_calls": self.attempts,
        }


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
    # Kontext only (defaults for FLUX.1, and in manifests written before Kontext existed).
    input_image: str | None = Field(default=None, description="the edit's input reference")
    input_image_sha256: str | None = None
    safety_tolerance: int = DEFAULT_SAFETY_TOLERANCE
    prompt_upsampling: bool = False
    cache_key: str
    finish_reason: FinishReason
    item_id: str | None = Field(default=None, description="the user's id for the prompt row")
    # A prompt rendered from table columns: its template, and the columns asked to be kept
    # (`keep_columns`), so downstream jobs can join the images back to their rows.
    prompt_template: str | None = None
    columns: dict[str, str] | None = None
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
        return ImageRequest.model_validate(self.model_dump(include=set(ImageRequest.model_fields)))


class BatchReport(BaseModel):
    """What a batch run returns: counts by outcome, what it cost, where every record is.

    `counts` has one key per finish reason, always all of them (0 when none): `SUCCESS`,
    `CONTENT_FILTERED`, `ERROR`, `SKIPPED_BUDGET`, and `PLANNED`, which only a dry run
    (`dry_run=True`) uses, for the images it would generate; a real run's `PLANNED` is 0.

    A small run keeps its records in memory; a big one does not (100,000 records would cost
    hundreds of MB): `records` then reads them back from the manifest on first use, and
    `iter_records()` streams them without holding them.
    """

    model_config = ConfigDict(populate_by_name=True)

    kept_records: list[ImageRecord] | None = Field(default=None, alias="records", repr=False)
    counts: dict[str, int] = Field(
        description="records by finish reason, every reason a key: SUCCESS, CONTENT_FILTERED, "
        "ERROR, SKIPPED_BUDGET and PLANNED (dry runs only)"
    )
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
    flow_run_id: str | None = None  # where the run's logs and artifacts are in the Prefect UI
    requested: int = Field(default=-1, description="records in the manifest: one per image asked")
    cached_successes: int = -1
    spilled: int = Field(default=-1, description="paid-for images kept in the spill folder")
    first_errors: list[ImageRecord] = Field(default_factory=list, repr=False)
    problems: list[str] = Field(
        default_factory=list, description="what the run could not record (e.g. the manifest)"
    )
    interrupted: bool = False  # stopped by Ctrl-C: some images were not attempted
    # The run's manifest on local disk while the run that wrote it finishes (sheet, artifacts).
    local_manifest: str | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _tally_kept(self) -> BatchReport:
        """A report built from records (older code, `flux-flows gallery`) derives its figures."""
        records = self.kept_records
        if records is not None:
            if self.requested < 0:
                self.requested = len(records)
            if self.cached_successes < 0:
                self.cached_successes = sum(
                    1 for r in records if r.cached and r.finish_reason is FinishReason.SUCCESS
                )
            if self.spilled < 0:
                self.spilled = sum(1 for r in records if r.spill_path)
            if not self.first_errors:
                errors = (r for r in records if r.finish_reason is FinishReason.ERROR)
                self.first_errors = list(itertools.islice(errors, FIRST_ERRORS))
        self.requested, self.cached_successes = (
            max(self.requested, 0),
            max(self.cached_successes, 0),
        )
        self.spilled = max(self.spilled, 0)
        return self

    @property
    def records(self) -> list[ImageRecord]:
        if self.kept_records is None:
            self.kept_records = list(self.iter_records())
        return self.kept_records

    def iter_records(self) -> Iterator[ImageRecord]:
        """Every record in manifest order, streamed from the manifest when not kept in memory."""
        if self.kept_records is not None:
            yield from self.kept_records
        elif self.local_manifest or self.manifest_uri:
            yield from iter_manifest(self.local_manifest or self.manifest_uri or "")

    @property
    def failed(self) -> int:
        return self.counts.get(FinishReason.ERROR, 0)


# The manifest's line format belongs to the record it serializes; records/manifests.py writes
# and assembles whole manifests with it.


def parse_manifest_lines(lines: Iterable[bytes], source: str) -> Iterator[ImageRecord]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield ImageRecord.model_validate_json(line)
        except ValueError as exc:
            raise ValueError(f"{source} line {number} is not a manifest record: {exc}") from exc


def iter_manifest(uri: str, *, aws_credentials: Any = None) -> Iterator[ImageRecord]:
    """A manifest's records, streamed: a 100,000-line manifest is never held whole."""
    yield from parse_manifest_lines(iter_uri_lines(uri, aws_credentials=aws_credentials), uri)
