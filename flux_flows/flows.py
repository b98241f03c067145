"""The batch flows: prompts in; images, a manifest and artifacts out; nothing paid for twice.

Order of a run: validate every prompt (bad input costs nothing), check the destination is
writable and the key is set, list what the destination already holds, then render each distinct
missing image (on threads here, or in chunks on Dask workers or work-pool runs: `dispatch`) with
at most `max_concurrency` in flight (and at most `requests_per_minute`), each leased first so no
other run pays for it too (`claims`), record every outcome, and write the manifest next to the
images.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Completed, Failed, State

from flux_flows.blocks import FireworksCredentials
from flux_flows.errors import BatchFailedError, StorageError
from flux_flows.gallery import write_contact_sheets
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.planning import layout
from flux_flows.planning.claims import close_heartbeat, remove_run_holders
from flux_flows.planning.plan import BatchPlan, PlannedImage, plan_run
from flux_flows.planning.sources import PromptRow, iter_prompts, normalize_prompts
from flux_flows.planning.templates import table_spec
from flux_flows.records.events import BatchAnnouncer
from flux_flows.records.join import finished_records, iter_records
from flux_flows.records.manifests import (
    ManifestSpool,
    PartWriter,
    destination_of_manifest,
    iter_manifest,
    load_manifest,
    merged_manifest,
)
from flux_flows.records.reports import count_outcomes, publish_artifacts
from flux_flows.rendering.dispatch import render_all
from flux_flows.rendering.flow_class import flux_flow
from flux_flows.rendering.one_image import RenderJob, RenderResult
from flux_flows.rendering.overlap import settle_taken
from flux_flows.rendering.pacing import AdaptiveWindow, Pacer
from flux_flows.rendering.preflight import preflight
from flux_flows.rendering.progress import ProgressReporter
from flux_flows.rendering.spill import SpillFolder
from flux_flows.rendering.window import INTERRUPTED
from flux_flows.results import BatchReport, ImageRecord
from flux_flows.settings import BATCH_DEFAULTS, DEFAULT_DESTINATION, BatchOptions
from flux_flows.storage import Storage, open_storage

__all__ = [
    "AdaptiveWindow",
    "Pacer",
    "generate_images",
    "generate_images_from_file",
    "replay_failed",
    "replay_rows",
    "run_batch",
]

D = BATCH_DEFAULTS  # the signatures' defaults, written once in settings.py


def run_batch(
    rows: Iterable[PromptRow], options: BatchOptions, *, source: str | None = None
) -> State:
    """The body shared by the flows; returns the final state carrying the BatchReport. Its end
    is announced as one Prefect event, its manifest as an asset (`batch_events`)."""
    with BatchAnnouncer(options, source) as announcer:
        return announcer.ended(_run_batch(rows, options, announcer))


def _run_batch(
    rows: Iterable[PromptRow], options: BatchOptions, announcer: BatchAnnouncer
) -> State:
    started = time.perf_counter()
    logger = get_run_logger()
    storage = open_storage(options.destination, aws_credentials=options.aws_credentials)
    spill = SpillFolder(storage.root_uri, options.spill_dir)
    plan = plan_run(
        rows,
        options,
        storage,
        aws_credentials=options.aws_credentials,
        preflight=lambda: preflight(options, storage, spill),
    )
    logger.info(
        "%d images requested: %d distinct, %d already stored, %d to generate (est. $%.4f)%s",
        len(plan.images),
        len(plan.unique),
        sum(1 for k in plan.unique if k in plan.stored),
        len(plan.to_generate),
        plan.estimated_cost_usd,
        f", {len(plan.skipped_for_budget)} over budget" if plan.skipped_for_budget else "",
    )
    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    flow_run_id = str(flow_run.id) if flow_run else None
    run_id = announcer.run_id = layout.new_run_id(flow_run.name if flow_run else None)
    parts = PartWriter(storage, run_id)
    results: dict[str, RenderResult] = {}
    if not options.dry_run:
        try:
            results = _render(plan, options, storage, spill, flow_run_id, parts, run_id)
        finally:
            close_heartbeat(storage, run_id)
            remove_run_holders(storage, run_id)
    spool = ManifestSpool(keep_all=options.dry_run)
    try:
        for record in iter_records(plan, storage, results):
            spool.add(record)
    finally:
        spool.finish()
    api_calls = sum(r.api_calls for r in results.values())
    interrupted = any(r.error == INTERRUPTED for r in results.values())
    estimated, saved = plan.estimated_cost_usd, plan.saved_usd
    del plan, results  # the manifest holds them now: the contact sheet's pages need the memory
    report = BatchReport(
        records=spool.kept,
        counts=spool.all_counts(),
        api_calls=api_calls,
        cache_hits=spool.cache_hits,
        manifest_uri=None,
        destination=storage.root_uri,
        spill_dir=str(spill.path),
        estimated_cost_usd=estimated if options.dry_run else spool.cost_usd,
        saved_usd=saved,
        dry_run=options.dry_run,
        flow_run_id=flow_run_id,
        requested=spool.requested,
        cached_successes=spool.cached_successes,
        spilled=spool.spilled,
        first_errors=spool.first_errors,
        interrupted=interrupted,
    )
    try:
        # The contact sheet and the summary artifact show the time so far (all but their own
        # writing); the report returned says the whole run's.
        report.wall_time_s = time.perf_counter() - started
        if not options.dry_run:
            _record_run(report, options, storage, spill, run_id, spool, parts, logger)
        report.wall_time_s = time.perf_counter() - started
    finally:
        spool.discard()
    return _final_state(report, options.fail_on_error)


def _render(
    plan: BatchPlan,
    options: BatchOptions,
    storage: Storage,
    spill: SpillFolder,
    flow_run_id: str | None,
    parts: PartWriter,
    run_id: str,
) -> dict[str, RenderResult]:
    """Render what the plan says, writing each finished batch of records as a manifest part.

    Each image is leased before it is paid for (`claims`): one another live run is making is
    waited for afterwards and found stored, or made here once that run lets go (`overlap`).
    """
    progress = ProgressReporter(total=len(plan.to_generate))
    make_job = functools.partial(
        RenderJob,
        storage=storage,
        spill=spill,
        credentials=options.credentials,
        aws_credentials=options.aws_credentials,
        flow_run_id=flow_run_id,
        concurrency_limit=options.concurrency_limit,
        thumbnails=options.thumbnails,
        run_id=run_id,
    )

    def write_part(finished: list[RenderResult]) -> None:
        settled = [r for r in finished if not r.taken_by]  # the rest are not finished yet
        try:
            parts.write(finished_records(plan, storage, settled))
        except (StorageError, OSError) as exc:  # the images are stored; only the early copy is lost
            get_run_logger().warning("could not write a manifest part: %s", exc)

    work_dir = f"{layout.RUNS}{run_id}/chunks/"
    images = [plan.unique[key] for key in plan.to_generate]
    results = render_all(images, options, progress, make_job, write_part, work_dir)
    passes = iter(range(1, 1_000_000))

    def render_again(again: Sequence[PlannedImage]) -> dict[str, RenderResult]:
        where = f"{work_dir}again-{next(passes)}/"
        return render_all(again, options, progress, make_job, write_part, where)

    results = settle_taken(plan, storage, run_id, results, render_again, progress)
    progress.finish()
    return results


def _record_run(
    report: BatchReport,
    options: BatchOptions,
    storage: Storage,
    spill: SpillFolder,
    run_id: str,
    spool: ManifestSpool,
    parts: PartWriter,
    logger: Any,
) -> None:
    """Manifest, contact sheet and artifacts; what could not be stored is said, never dropped."""
    report.local_manifest = str(spool.path)
    latest = merged_manifest(options.merge_into, spool.path, options.aws_credentials)
    try:
        report.manifest_uri = spool.store(storage, run_id, latest=latest.path if latest else None)
        parts.remove()
    except StorageError as exc:
        kept = spill.keep_manifest(run_id, spool.path)
        problem = f"manifest NOT stored ({exc}); a copy is kept at {kept}"
        report.problems.append(problem)
        logger.error("could not store the manifest: %s; a copy is kept at %s", exc, kept)
    try:
        merged = None if latest is None else (iter_manifest(str(latest.path)), latest.all_counts())
        report.contact_sheet_uri = write_contact_sheets(storage, run_id, report, merged)
    except (StorageError, OSError) as exc:
        logger.error("could not store the contact sheet: %s", exc)
    finally:
        if latest is not None:
            latest.discard()
    publish_artifacts(report, storage=storage)
    report.local_manifest = None


def _final_state(report: BatchReport, fail_on_error: bool) -> State:
    counts = report.counts
    message = (
        f"{report.requested} images: {counts['SUCCESS']} succeeded, "
        f"{counts['CONTENT_FILTERED']} filtered, {report.cache_hits} served from cache, "
        f"{counts['ERROR']} failed, {counts['SKIPPED_BUDGET']} skipped for budget; "
        f"{report.api_calls} API calls"
    )
    if report.spilled:
        message += f"; {report.spilled} kept locally in {report.spill_dir}"
    for problem in report.problems:
        message += f"; {problem}"
    if fail_on_error and (counts["ERROR"] or report.problems):
        return Failed(message=message, data=BatchFailedError(message, report=report))
    return Completed(message=message, data=report)


@flux_flow(name="generate-images", persist_result=False, log_prints=True)
def generate_images(
    prompts: list[str | dict[str, Any] | ImageRequest],
    destination: str = DEFAULT_DESTINATION,
    *,
    model: str = D.model,
    aspect_ratio: str = D.aspect_ratio,
    seed: int | None = D.seed,
    base_seed: int | None = D.base_seed,
    variants: int = D.variants,
    guidance_scale: float = D.guidance_scale,
    num_inference_steps: int | None = D.num_inference_steps,
    output_format: str = D.output_format,
    safety_check: bool = D.safety_check,
    max_concurrency: int = D.max_concurrency,
    requests_per_minute: float | None = D.requests_per_minute,
    credentials: FireworksCredentials | None = None,
    aws_credentials: Any = None,
    dry_run: bool = D.dry_run,
    budget_usd: float | None = D.budget_usd,
    prices: dict[str, float] | None = D.prices,
    spill_dir: str | None = D.spill_dir,
    concurrency_limit: str | None = D.concurrency_limit,
    rate_limit: str | None = D.rate_limit,
    fail_on_error: bool = D.fail_on_error,
    per_image_tasks: bool = D.per_image_tasks,
    thumbnails: bool = D.thumbnails,
    chunk_size: int = D.chunk_size,
    chunk_deployment: str | None = D.chunk_deployment,
    input_images: list[str] | str | None = D.input_images,
    safety_tolerance: int | None = D.safety_tolerance,
    prompt_upsampling: bool | None = D.prompt_upsampling,
    prompt_template: str | None = D.prompt_template,
    template_defaults: dict[str, str] | None = D.template_defaults,
    keep_columns: list[str] | None = D.keep_columns,
    events: bool = D.events,
    staged_prompts: str | None = None,
) -> BatchReport:
    """Generate an image per prompt (x `variants`) into `destination`, never paying twice.

    `prompts` are strings or dicts with a "prompt" and per-prompt overrides (any ImageRequest
    field, plus an "id" carried into the manifest). `destination` is `s3://bucket/prefix` or a
    local folder. Images already in the destination are not generated again; identical requests
    in the batch are generated once. Returns a BatchReport; the run's state message says how many
    failed (set `fail_on_error=True` to make failures fail the run). A list too big for a Prefect
    parameter (over ~256 KB of JSON) is written to `<destination>/runs/<stamp>-staged-<id>/
    prompts.jsonl` before the run starts, and the run reads it from `staged_prompts`.

    Images run on local threads, recorded in the manifest and artifacts rather than as one
    Prefect task run each (a task run cost ~4-7 ms of client CPU and ~10-30 ms of Prefect-server
    CPU in benchmarks/RESULTS.md's historical runs, whose raw output was not kept). Under any
    other task runner (`with_options(task_runner=DaskTaskRunner(...))`) the plan is cut into
    chunks of up to `chunk_size` images, one task run each, rendered on threads in the worker
    with a share of the batch's limits.
    `per_image_tasks=True` makes one task run per image instead (visible in the UI, slower).
    `seed` is sent as is for each prompt's first image, its variants step from it (seed + 1,
    ...); `base_seed` derives the seeds from (base_seed, prompt, variant) instead; a prompt's
    own seed wins (README "Seeds").
    `thumbnails=False` skips the contact sheet's 256 px thumbnails (~4 ms of CPU and one more
    PUT per image: `bench_batch.py --repeat 3` in benchmarks/RESULTS.md); the sheet then shows
    the full images.
    When the batch ends it sends one `flux-flows.batch.completed` or `.failed` Prefect event and
    records the manifest as an asset, for triggers downstream (deployments/README.md);
    `events=False` sends neither.

    FLUX Kontext (`model="flux-kontext-pro"` or `"flux-kontext-max"`, batch-wide or per prompt)
    takes `safety_tolerance` (0 strict .. 6 permissive) and `prompt_upsampling`. `input_images`
    makes it an edit batch: a list of references (paths, `s3://` objects, URLs, data URIs), or a
    folder or `s3://bucket/prefix/` whose .jpg/.jpeg/.png/.webp files are used; every prompt is
    applied to every image. Each image is read once to hash its content, so a renamed copy of a
    photo is not paid for twice. A moderated Kontext task is recorded as CONTENT_FILTERED.

    Example:
        ```python
        report = generate_images(["a red fox", "a blue whale"], "s3://assets/animals/", variants=2)
        print(report.counts, report.manifest_uri)
        generate_images(["make it winter"], "s3://assets/winter/", model="flux-kontext-pro",
                        input_images="s3://assets/products/photos/")
        ```
    """
    options = BatchOptions.from_params(locals())
    table = table_spec(prompt_template, template_defaults, keep_columns)
    if staged_prompts:  # a list too big for a flow-run parameter, written there by the caller
        get_run_logger().info("reading the prompt list staged at %s", staged_prompts)
        rows = iter_prompts(staged_prompts, aws_credentials=aws_credentials, table=table)
    else:
        rows = iter(normalize_prompts(prompts, table))  # let go of each row once it is planned
    return run_batch(rows, options)  # type: ignore[return-value]


@flux_flow(name="generate-images-from-file", persist_result=False, log_prints=True)
def generate_images_from_file(
    source: str,
    destination: str = DEFAULT_DESTINATION,
    *,
    model: str = D.model,
    aspect_ratio: str = D.aspect_ratio,
    seed: int | None = D.seed,
    base_seed: int | None = D.base_seed,
    variants: int = D.variants,
    guidance_scale: float = D.guidance_scale,
    num_inference_steps: int | None = D.num_inference_steps,
    output_format: str = D.output_format,
    safety_check: bool = D.safety_check,
    max_concurrency: int = D.max_concurrency,
    requests_per_minute: float | None = D.requests_per_minute,
    credentials: FireworksCredentials | None = None,
    aws_credentials: Any = None,
    dry_run: bool = D.dry_run,
    budget_usd: float | None = D.budget_usd,
    prices: dict[str, float] | None = D.prices,
    spill_dir: str | None = D.spill_dir,
    concurrency_limit: str | None = D.concurrency_limit,
    rate_limit: str | None = D.rate_limit,
    fail_on_error: bool = D.fail_on_error,
    per_image_tasks: bool = D.per_image_tasks,
    thumbnails: bool = D.thumbnails,
    chunk_size: int = D.chunk_size,
    chunk_deployment: str | None = D.chunk_deployment,
    input_images: list[str] | str | None = D.input_images,
    safety_tolerance: int | None = D.safety_tolerance,
    prompt_upsampling: bool | None = D.prompt_upsampling,
    prompt_template: str | None = D.prompt_template,
    template_defaults: dict[str, str] | None = D.template_defaults,
    keep_columns: list[str] | None = D.keep_columns,
    events: bool = D.events,
) -> BatchReport:
    """The batch, reading prompts from a file: local path or `s3://bucket/key`.

    `.txt`: one prompt a line (blank lines and `#` comments skipped). `.csv`: a `prompt` column and
    optional per-row `model`, `aspect_ratio`, `seed`, `guidance_scale`, `num_inference_steps`,
    `safety_check`, `output_format`, `id` (and for Kontext `input_image`, `safety_tolerance`,
    `prompt_upsampling`). `.jsonl`: one object a line with the same keys. `.parquet` (with
    `pip install 'flux-flows[parquet]'`): the same columns. `input_images` makes it an edit batch,
    as in `generate_images`. `prompt_template="studio photo of a {name} in {colour}"` makes each
    row's prompt from its columns (`template_defaults={"colour": "white"}` fills gaps), and
    `keep_columns=["sku"]` carries those columns into the manifest and the S3 metadata.

    Example:
        ```python
        generate_images_from_file("s3://prompts/2026-11-24.jsonl", "s3://assets/products/")
        ```
    """
    options = BatchOptions.from_params(locals())
    table = table_spec(prompt_template, template_defaults, keep_columns)
    rows = iter_prompts(source, aws_credentials=aws_credentials, table=table)
    return run_batch(rows, options, source=source)  # type: ignore[return-value]


def replay_rows(
    records: Sequence[ImageRecord], manifest_uri: str, *, include_skipped: bool
) -> list[PromptRow]:
    """The exact requests (seed and all) of the records that did not finish, as prompt rows."""
    wanted = (
        {FinishReason.ERROR, FinishReason.SKIPPED_BUDGET}
        if include_skipped
        else {FinishReason.ERROR}
    )
    rows = []
    for number, record in enumerate(records, start=1):
        if record.finish_reason in wanted:
            fields: dict[str, Any] = record.to_request().model_dump()
            if record.item_id is not None:
                fields["id"] = record.item_id
            where = f"{manifest_uri} line {number}"
            rows.append(
                PromptRow(fields, where, record.index, record.variant, columns=record.columns)
            )
    return rows


@flux_flow(name="replay-failed", persist_result=False, log_prints=True)
def replay_failed(
    manifest_uri: str,
    destination: str | None = None,
    *,
    include_skipped: bool = False,
    max_concurrency: int = D.max_concurrency,
    requests_per_minute: float | None = D.requests_per_minute,
    credentials: FireworksCredentials | None = None,
    aws_credentials: Any = None,
    budget_usd: float | None = D.budget_usd,
    prices: dict[str, float] | None = D.prices,
    spill_dir: str | None = D.spill_dir,
    concurrency_limit: str | None = D.concurrency_limit,
    rate_limit: str | None = D.rate_limit,
    fail_on_error: bool = D.fail_on_error,
    events: bool = D.events,
) -> BatchReport:
    """Re-submit exactly the ERROR (and, if asked, SKIPPED_BUDGET) records of an earlier manifest.

    Each request goes out with its original seed and parameters, so a success lands where the
    first run would have put it; a new manifest records the replay. `destination` defaults to
    the one the manifest was written into.

    With nothing to re-submit, no run is made: the report has `requested == 0`, no API calls,
    and `manifest_uri` is the manifest it read (still the record of every image).

    Example:
        ```python
        replay_failed("s3://assets/products/manifest.jsonl")
        ```
    """
    records = load_manifest(manifest_uri, aws_credentials=aws_credentials)
    rows = replay_rows(records, manifest_uri, include_skipped=include_skipped)
    target = destination or destination_of_manifest(manifest_uri)
    if not rows:
        get_run_logger().info("nothing to replay: %s has no failed records", manifest_uri)
        empty = BatchReport(
            records=[],
            counts=count_outcomes([]),
            api_calls=0,
            cache_hits=0,
            manifest_uri=manifest_uri,
            destination=target,
            requested=0,
        )
        return Completed(message="nothing to replay", data=empty)  # type: ignore[return-value]
    # The rows carry every request field of the original records; the batch defaults do not apply.
    # The destination's manifest stays the whole of the replayed one, with the new outcomes in.
    options = BatchOptions.from_params(
        {
            **locals(),
            "destination": target,
            "merge_into": manifest_uri,
            "prompt_template": next(
                (r.prompt_template for r in records if r.prompt_template), None
            ),
        }
    )
    return run_batch(rows, options)  # type: ignore[return-value]
