"""The batch engine under the three flows: plan, render, record; nothing paid for twice.

Order of a run: validate every prompt (bad input costs nothing), check the destination is
writable and the key is set, list what the destination already holds, then render each distinct
missing image (on threads here, or in chunks on Dask workers or work-pool runs:
`rendering.dispatch`) with at most `max_concurrency` in flight (and at most
`requests_per_minute`), each leased first so no other run pays for it too (`planning.claims`),
record every outcome, write the manifest next to the images, and announce the end
(`records.events`). The public flows in `flows` only turn their parameters into rows and options.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Completed, Failed, State

from flux_flows.errors import BatchFailedError, StorageError
from flux_flows.gallery import write_contact_sheets
from flux_flows.planning import layout
from flux_flows.planning.claims import close_heartbeat, remove_run_holders
from flux_flows.planning.plan import BatchPlan, PlannedImage, plan_run
from flux_flows.planning.sources import PromptRow
from flux_flows.records.events import BatchAnnouncer
from flux_flows.records.join import finished_records, iter_records
from flux_flows.records.manifests import (
    ManifestSpool,
    PartWriter,
    iter_manifest,
    merged_manifest,
)
from flux_flows.records.reports import publish_artifacts
from flux_flows.rendering.dispatch import render_all
from flux_flows.rendering.one_image import RenderJob, RenderResult
from flux_flows.rendering.overlap import settle_taken
from flux_flows.rendering.preflight import preflight
from flux_flows.rendering.progress import ProgressReporter
from flux_flows.rendering.spill import SpillFolder
from flux_flows.rendering.window import INTERRUPTED
from flux_flows.results import BatchReport
from flux_flows.settings import BatchOptions
from flux_flows.storage import Storage, open_storage

__all__ = ["run_batch"]


def run_batch(
    rows: Iterable[PromptRow], options: BatchOptions, *, source: str | None = None
) -> State:
    """The body shared by the flows; returns the final state carrying the BatchReport. Its end
    is announced as one Prefect event, its manifest as an asset (`records.events`)."""
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
    _log_plan(plan, logger)
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
    report = _report_of(plan, results, spool, options, storage.root_uri, str(spill.path))
    report.flow_run_id = flow_run_id  # None outside a flow run (a test calling the engine)
    del plan, results  # the manifest holds them now: the contact sheet's pages need the memory
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


def _log_plan(plan: BatchPlan, logger: Any) -> None:
    logger.info(
        "%d images requested: %d distinct, %d already stored, %d to generate (est. $%.4f)%s",
        len(plan.images),
        len(plan.unique),
        sum(1 for k in plan.unique if k in plan.stored),
        len(plan.to_generate),
        plan.estimated_cost_usd,
        f", {len(plan.skipped_for_budget)} over budget" if plan.skipped_for_budget else "",
    )


def _report_of(
    plan: BatchPlan,
    results: dict[str, RenderResult],
    spool: ManifestSpool,
    options: BatchOptions,
    destination: str,
    spill_dir: str,
) -> BatchReport:
    """The report from the spooled records' tally: the records themselves stay in the spool."""
    return BatchReport(
        records=spool.kept,
        counts=spool.all_counts(),
        api_calls=sum(r.api_calls for r in results.values()),
        cache_hits=spool.cache_hits,
        manifest_uri=None,
        destination=destination,
        spill_dir=spill_dir,
        estimated_cost_usd=plan.estimated_cost_usd if options.dry_run else spool.cost_usd,
        saved_usd=plan.saved_usd,
        dry_run=options.dry_run,
        requested=spool.requested,
        cached_successes=spool.cached_successes,
        spilled=spool.spilled,
        first_errors=spool.first_errors,
        interrupted=any(r.error == INTERRUPTED for r in results.values()),
    )
