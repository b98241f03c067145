"""render_image: the work a batch does per distinct image (generate, then store).

It runs the steps as plain functions rather than nested tasks: a task run costs ~5 ms of client
CPU and ~30 ms of Prefect-server CPU (measured, benchmarks/RESULTS.md). For the same reason the
batch calls it on plain threads by default, and as one Prefect task run per image only with
`per_image_tasks=True` or a non-thread runner such as Dask. It returns a small `RenderResult`,
never the bytes, so 10,000 results fit in memory, and it is not cached by Prefect: the
destination itself is the cache (a Prefect cache hit could vouch for an object that was since
deleted, or that only reached the spill folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from flux_flows.blocks import FireworksCredentials, shared_client
from flux_flows.errors import FluxError, StorageError
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.planning import claims, layout
from flux_flows.rendering import limit_settings
from flux_flows.rendering.spill import SpillFolder
from flux_flows.rendering.thumbnails import store_thumbnail
from flux_flows.results import GeneratedImage
from flux_flows.storage import Storage, s3_metadata

logger = logging.getLogger("flux_flows.rendering.one_image")


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a returned Failed state with exc_info but no exception ("NoneType: None").

    Installed by the first failing `render_image` task run of a process (a Dask worker's too),
    not at import: importing this module changes no logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


_NO_EMPTY_TRACEBACK = _NoEmptyTraceback()


@dataclass(frozen=True)
class RenderJob:
    """All a worker needs for one image; picklable, so it can cross to Dask workers.

    The run opens its storage and spill folder once and every job carries them: both hold
    settings only (a storage's boto3 client comes from the worker's own cache).
    """

    request: ImageRequest
    storage: Storage
    spill: SpillFolder
    credentials: FireworksCredentials | None = None
    aws_credentials: Any = None  # reads a Kontext edit's s3:// input image at send time
    flow_run_id: str | None = None
    # A Prefect global concurrency limit to take a slot of around the call. The batch's loop
    # holds the user's limit in blocks itself (`limits`) and sends its jobs without it.
    concurrency_limit: str | None = None
    known_key: str | None = None  # the request's cache key, when the plan already has it
    thumbnails: bool = True  # make the contact sheet's thumbnail of each SUCCESS image
    run_id: str | None = None  # the run whose lease on the image is taken first (`claims`)
    # The first planned row's id and kept columns, as `row-*` metadata (`row_metadata`).
    row: tuple[tuple[str, str], ...] = ()

    @property
    def cache_key(self) -> str:
        """The plan's own string when it has one: computed once, and shared by the result."""
        return self.known_key or self.request.cache_key


@dataclass(frozen=True, slots=True)
class RenderResult:
    """How one distinct image ended; fanned out by the flow to every record that asked for it.

    A run keeps one per generated image until its manifest is written, so it is a slotted
    dataclass (~0.5 KB with its strings), not a pydantic model (~1.6 KB with the same fields:
    `benchmarks/bench_sizes.py`, benchmarks/RESULTS.md), and it keeps keys, not the URIs made
    from them. It crosses processes by pickle (Dask) or as one JSON line (`to_json`/`from_json`,
    work pools).
    """

    cache_key: str
    finish_reason: FinishReason
    object_key: str | None = None  # its URI is `storage.uri_for(object_key)`
    thumbnail: bool = False  # stored at `layout.thumbnail_key(cache_key)`
    spill_path: str | None = None
    recovered_from_spill: bool = False
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    size_bytes: int | None = None
    request_id: str | None = None
    latency_s: float | None = None
    api_calls: int = 0
    throttled: int = 0
    error: str | None = None
    already_stored: bool = False  # found in the destination once its lease was held: not paid
    taken_by: str | None = None  # another live run holds its lease: the batch comes back to it

    def to_json(self) -> bytes:
        fields = {name: getattr(self, name) for name in _RESULT_FIELDS}
        fields["finish_reason"] = self.finish_reason.value
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, line: str | bytes) -> RenderResult:
        """One line of `to_json`; a line that is not one raises ValueError (a torn write)."""
        fields = json.loads(line)
        if not isinstance(fields, dict) or set(fields) - set(_RESULT_FIELDS):
            raise ValueError(f"not a render result: {str(line)[:200]!r}")
        try:
            fields["finish_reason"] = FinishReason(fields["finish_reason"])
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a render result ({exc}): {str(line)[:200]!r}") from exc


_RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(RenderResult))


# How long a slot taken from a Prefect global concurrency limit outlives a holder that stopped
# renewing it: a killed process's slots come back after a minute, not Prefect's default five
# (the server's minimum; `limit_settings.lease_s` reads FLUX_FLOWS_SLOT_LEASE_S).
SLOT_LEASE_S = limit_settings.SLOT_LEASE_S


@contextlib.contextmanager
def _api_slot(job: RenderJob) -> Iterator[None]:
    """Hold a slot of the job's Prefect global concurrency limit, if any, around the API call.

    Only for a job rendered on its own: a batch (its loop, a Dask chunk, a work-pool chunk run)
    holds the user's `concurrency_limit` in leased blocks of many slots for its life and sends
    its jobs without the name (`limits`, `window.render_windowed`): a slot per image costs two
    Prefect calls and held a batch to ~10 images/s (9.6-10.5 in benchmarks/RESULTS.md's
    historical runs, whose raw output was not kept).
    """
    if not job.concurrency_limit:
        yield
        return
    from prefect.concurrency.sync import concurrency

    # strict: a limit that does not exist must not silently mean "no limit" (Prefect's default
    # only logs a warning and lets every call through). A failed lease renewal only warns: the
    # request it guards is being paid for, and cancelling it would lose the image.
    with concurrency(
        job.concurrency_limit,
        occupy=1,
        strict=True,
        lease_duration=limit_settings.lease_s(),
        raise_on_lease_renewal_failure=False,
    ):
        yield


def image_metadata(
    image: GeneratedImage,
    *,
    flow_run_id: str | None = None,
    row: tuple[tuple[str, str], ...] = (),
) -> dict[str, str]:
    """Provenance stored on the object itself, so an image found alone still says where it came
    from; `row` joins it back to the prompt row that asked for it first."""
    request = image.request
    fields: dict[str, object] = {
        "seed": request.seed,
        "model": request.model,
        "finish-reason": image.finish_reason.value,
        "aspect-ratio": request.aspect_ratio,
        "cache-key": request.cache_key,
        "generator": "flux-flows",
    }
    if request.is_kontext:
        fields["safety-tolerance"] = request.safety_tolerance
        if request.input_image_sha256:  # the reference itself may be a huge data URI
            fields["input-image-sha256"] = request.input_image_sha256
    else:
        fields["steps"] = request.num_inference_steps
        fields["guidance-scale"] = request.guidance_scale
    if image.request_id:
        fields["request-id"] = image.request_id
    if flow_run_id:
        fields["flow-run-id"] = flow_run_id
    fields.update(row)
    fields["prompt"] = request.prompt
    return s3_metadata(fields)


def store_image(
    storage: Storage,
    image: GeneratedImage,
    *,
    flow_run_id: str | None = None,
    row: tuple[tuple[str, str], ...] = (),
) -> tuple[str, str]:
    """Write one answer where its cache key says; filtered answers never land beside real images."""
    key = layout.image_key(image.request, image.finish_reason)
    uri = storage.put(
        key,
        image.data,
        content_type=image.content_type,
        metadata=image_metadata(image, flow_run_id=flow_run_id, row=row),
    )
    return key, uri


def store_with_thumbnail(
    storage: Storage, image: GeneratedImage, *, flow_run_id: str | None = None
) -> tuple[str, str | None]:
    """Store the image, then (for a SUCCESS) its thumbnail: URIs of both (thumbnail may be None).

    The thumbnail is made from the bytes in hand; a thumbnail failure is only logged.
    """
    _, uri = store_image(storage, image, flow_run_id=flow_run_id)
    if image.finish_reason is not FinishReason.SUCCESS:
        return uri, None
    thumbnail = store_thumbnail(storage, image.request.cache_key, image.data)
    return uri, thumbnail[1] if thumbnail else None


def _with_thumbnail(
    storage: Storage, result: RenderResult, data: bytes, finish_reason: FinishReason
) -> RenderResult:
    """Add the thumbnail of a stored SUCCESS image, made from bytes still in memory.

    Filtered answers get none (they are not real images); a failure leaves the result as it is.
    """
    if finish_reason is not FinishReason.SUCCESS:
        return result
    stored = store_thumbnail(storage, result.cache_key, data)
    if stored is None:
        return result
    return dataclasses.replace(result, thumbnail=True)


def _store_or_spill(job: RenderJob, image: GeneratedImage, result: RenderResult) -> RenderResult:
    """Upload; if storage still fails after boto3's retries, keep the bytes in the spill folder."""
    storage, spill = job.storage, job.spill
    try:
        key, _ = store_image(storage, image, flow_run_id=job.flow_run_id, row=job.row)
    except (StorageError, OSError) as exc:
        key = layout.image_key(image.request, image.finish_reason)
        try:
            path = spill.save(
                result.cache_key,
                image.data,
                object_key=key,
                content_type=image.content_type,
                metadata=image_metadata(image, flow_run_id=job.flow_run_id, row=job.row),
            )
        except OSError as spill_exc:
            error = (
                f"generated (paid for) but lost: upload failed ({exc}) and it could not be kept "
                f"locally in {spill.path} ({spill_exc.strerror or spill_exc})"
            )
            logger.error("%s", error)
            return dataclasses.replace(result, finish_reason=FinishReason.ERROR, error=error)
        logger.warning("upload failed, image kept at %s: %s", path, exc)
        return dataclasses.replace(
            result, spill_path=str(path), error=f"upload failed, kept locally: {exc}"
        )
    stored = dataclasses.replace(result, object_key=key)
    if not job.thumbnails:
        return stored
    return _with_thumbnail(storage, stored, image.data, image.finish_reason)


def _recover_spilled(job: RenderJob) -> RenderResult | None:
    """An earlier run paid for this image but could not store it: upload it now, pay nothing."""
    storage, spill = job.storage, job.spill
    cache_key = job.cache_key
    found = spill.load(cache_key)
    if found is None:
        return None
    data, meta = found
    finish = (
        FinishReason.CONTENT_FILTERED
        if meta["object_key"].startswith(layout.FILTERED)
        else FinishReason.SUCCESS
    )
    result = RenderResult(
        cache_key=cache_key,
        finish_reason=finish,
        recovered_from_spill=True,
        content_type=meta["content_type"],
        size_bytes=len(data),
    )
    try:
        storage.put(
            meta["object_key"],
            data,
            content_type=meta["content_type"],
            metadata=meta.get("metadata") or None,
        )
    except (StorageError, OSError) as exc:
        path = str(spill.data_path(cache_key))
        return dataclasses.replace(
            result,
            spill_path=path,
            error=f"upload failed again, still kept locally: {exc}",
        )
    spill.remove(cache_key)
    stored = dataclasses.replace(result, object_key=meta["object_key"])
    if not job.thumbnails:
        return stored
    return _with_thumbnail(storage, stored, data, finish)


def found_stored(storage: Storage, request: ImageRequest, cache_key: str) -> RenderResult | None:
    """The image if the destination holds it now (a retried chunk's first attempt, or another
    run that stored it since this run listed): two HEADs, no API call."""
    for finish in (FinishReason.SUCCESS, FinishReason.CONTENT_FILTERED):
        key = layout.image_key(request, finish)
        if storage.exists(key):
            return RenderResult(
                cache_key=cache_key,
                finish_reason=finish,
                object_key=key,
                thumbnail=finish is FinishReason.SUCCESS,
                already_stored=True,
            )
    return None


def taken_result(cache_key: str, holder: str) -> RenderResult:
    return RenderResult(
        cache_key=cache_key,
        finish_reason=FinishReason.ERROR,
        error=f"not generated: {holder} is generating it into this destination",
        taken_by=holder,
    )


def render(job: RenderJob) -> RenderResult:
    """Generate and store one image; a FluxError propagates with its attempt count.

    The image's lease (`claims`) is held from before the last look at the destination until
    it is stored, so no other run or retried chunk pays for it meanwhile.
    """
    recovered = _recover_spilled(job)
    if recovered is not None:
        return recovered
    with claims.holding(job.storage, job.run_id, job.cache_key) as lease:
        if isinstance(lease, claims.Taken):
            return taken_result(job.cache_key, lease.holder)
        if lease is not None:
            found = found_stored(job.storage, job.request, job.cache_key)
            if found is not None:
                return found
        client = shared_client(job.credentials)
        with _api_slot(job):
            # A Kontext edit's s3:// input is read with the run's AWS credentials, at send time.
            image = client.generate(job.request, aws_credentials=job.aws_credentials)
        result = RenderResult(cache_key=job.cache_key, throttled=image.throttled, **image.facts())
        return _store_or_spill(job, image, result)


@task(name="render-image", retries=0, cache_policy=NO_CACHE, persist_result=False)
def render_image(job: RenderJob) -> RenderResult:
    """Generate one image and store it; a failure ends Failed with a one-line message, no traceback.

    The Failed state carries a RenderResult (finish reason ERROR, the error text and the API
    calls spent), so the flow records it and the other images go on.
    """
    try:
        return render(job)
    except FluxError as exc:
        result = RenderResult(
            cache_key=job.cache_key,
            finish_reason=FinishReason.ERROR,
            api_calls=exc.attempts,
            throttled=exc.throttled,
            error=f"{type(exc).__name__}: {exc}",
        )
        # addFilter keeps one copy of a filter, so this costs a list lookup per failure.
        logging.getLogger("prefect.task_runs").addFilter(_NO_EMPTY_TRACEBACK)
        # A task's return type is its result's; Prefect also accepts a State, which carries the
        # RenderResult as data and marks the task run Failed in the UI.
        return Failed(message=result.error, data=result)  # type: ignore[return-value]
