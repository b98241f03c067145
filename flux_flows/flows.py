"""The batch flows: prompts in; images, a manifest and artifacts out; nothing paid for twice.

Order of a run: validate every prompt (bad input costs nothing), check the destination is
writable and the key is set, list what the destination already holds, then submit one
`render_image` per distinct missing image with at most `max_concurrency` in flight (and at most
`requests_per_minute`), record every outcome, and write the manifest next to the images.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flux_flows import layout
from flux_flows.batch import BatchPlan, PlannedImage, expand, find_stored, plan_batch
from flux_flows.blocks import FireworksCredentials
from flux_flows.errors import AuthenticationError, BatchFailedError, StorageError
from flux_flows.gallery import write_contact_sheets
from flux_flows.images_in import list_input_images
from flux_flows.models import SCHNELL, BatchReport, FinishReason, ImageRecord, ImageRequest
from flux_flows.pricing import price_table
from flux_flows.progress import ProgressReporter
from flux_flows.prompts import PromptRow, normalize_prompts, read_prompts
from flux_flows.render import RenderJob, RenderResult, render_image
from flux_flows.reporting import (
    count_outcomes,
    destination_of_manifest,
    load_manifest,
    manifest_bytes,
    publish_artifacts,
    write_manifests,
)
from flux_flows.spill import SpillFolder
from flux_flows.startup import flux_flow
from flux_flows.storage import Storage, open_storage
from flux_flows.tasks import flux_client

DEFAULT_DESTINATION = "./flux-flows-output"
DEFAULT_MAX_CONCURRENCY = 8
# Pace a little under the stated limit: the account's window and our clock never agree exactly.
RPM_HEADROOM = 0.98


@dataclass(frozen=True)
class BatchOptions:
    """Everything a run needs besides its prompts; built from the flow's parameters."""

    destination: str
    defaults: Mapping[str, Any]
    seed: int | None
    variants: int
    max_concurrency: int
    requests_per_minute: float | None
    credentials: FireworksCredentials | None
    aws_credentials: Any
    dry_run: bool
    budget_usd: float | None
    prices: Mapping[str, float] | None
    spill_dir: str | None
    concurrency_limit: str | None
    fail_on_error: bool
    # FLUX Kontext edit batch: a list of image references, or a folder / s3:// prefix to list.
    input_images: Sequence[str] | str | None = None
    # One Prefect task run per image (visible in the UI, needed for Dask) or plain threads.
    per_image_tasks: bool = False

    def check(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.requests_per_minute is not None and self.requests_per_minute <= 0:
            raise ValueError(
                f"requests_per_minute must be positive, got {self.requests_per_minute}"
            )


class Pacer:
    """Spaces submissions evenly to stay under a requests-per-minute limit (no bursts)."""

    def __init__(self, requests_per_minute: float | None) -> None:
        self.interval = 60.0 / (requests_per_minute * RPM_HEADROOM) if requests_per_minute else 0.0
        self.next_at = time.monotonic()

    def wait_s(self) -> float:
        return max(0.0, self.next_at - time.monotonic()) if self.interval else 0.0

    def take(self) -> None:
        # Keep the schedule when a submission is a little late (timer granularity, the GIL):
        # restarting it from "now" loses that lateness every time, ~2% of the rate here. More
        # than one interval behind, it restarts, so a catch-up is one extra request at most.
        self.next_at = max(self.next_at, time.monotonic() - self.interval) + self.interval


class AdaptiveWindow:
    """How many requests may be in flight: halved when the API answers 429, regrown by one per
    window's worth of clean answers (AIMD, as TCP does), never above `max_concurrency`.

    The client already waits out each 429 (honouring Retry-After); this keeps a whole batch from
    walking back into the limit the moment those waits end.
    """

    def __init__(self, maximum: int, *, cooldown_s: float = 1.0) -> None:
        self.maximum = maximum
        self.size = float(maximum)
        self.cooldown_s = cooldown_s
        self.decreases = 0
        self._last_decrease = -float("inf")

    @property
    def limit(self) -> int:
        return max(1, int(self.size))

    def observe(self, throttled: int) -> None:
        now = time.monotonic()
        if throttled:
            if now - self._last_decrease >= self.cooldown_s:
                self.size = max(1.0, self.size / 2)
                self.decreases += 1
                self._last_decrease = now
        else:
            self.size = min(float(self.maximum), self.size + 1.0 / self.size)


class _PlainFuture:
    """The parts of a PrefectFuture that `_render_all` uses, over a concurrent.futures.Future."""

    def __init__(self, inner: Future[Any]) -> None:
        self._inner = inner
        self.task_run_id = uuid.uuid4()

    def add_done_callback(self, fn: Any) -> None:
        self._inner.add_done_callback(lambda _: fn(self))

    def result(self, raise_on_failure: bool = True) -> Any:
        try:
            value = self._inner.result()
        except Exception as exc:
            if raise_on_failure:
                raise
            return exc
        # render_image returns Failed(data=RenderResult) for an API error.
        return value.data if isinstance(value, State) else value


class _PlainRunner:
    """Runs the body of a task on plain threads: no task run, no events, no rows on the server.

    A task run costs ~4 ms of client CPU and ~30 ms of Prefect-server CPU (its task-run
    recorder writes every state change); per image, that is more than the image's own work.
    The manifest and the table artifact still record every image.
    """

    def __init__(self, max_workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="flux-render")

    def submit(self, task: Any, parameters: dict[str, Any]) -> _PlainFuture:
        # As Prefect's runner does: the flow's contexts (settings, flow run) go with the work.
        context = contextvars.copy_context()
        return _PlainFuture(self._pool.submit(context.run, task.fn, **parameters))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


@contextlib.contextmanager
def _runner(max_concurrency: int, per_image_tasks: bool = False) -> Iterator[Any]:
    """A thread pool sized to the concurrency asked for, unless the user chose another runner.

    Prefect's default pool is unbounded; a DaskTaskRunner (or any other) is used as given, with
    the in-flight window below still bounding how much is submitted at once. Without
    `per_image_tasks`, local threads run the images without a Prefect task run each.
    """
    context = FlowRunContext.get()
    chosen = context.task_runner if context else None
    if chosen is None or isinstance(chosen, ThreadPoolTaskRunner):
        if not per_image_tasks:
            plain = _PlainRunner(max_concurrency)
            try:
                yield plain
            finally:
                plain.shutdown()
            return
        with ThreadPoolTaskRunner(max_workers=max_concurrency) as runner:
            yield runner
    else:
        yield chosen


def _result_of(future: PrefectFuture[Any], cache_key: str) -> RenderResult:
    value = future.result(raise_on_failure=False)
    if isinstance(value, RenderResult):
        return value
    error = value if isinstance(value, BaseException) else RuntimeError(str(value))
    return RenderResult(
        cache_key=cache_key,
        finish_reason=FinishReason.ERROR,
        error=f"{type(error).__name__}: {error}",
    )


def _render_all(
    plan: BatchPlan, options: BatchOptions, progress: ProgressReporter, flow_run_id: str | None
) -> dict[str, RenderResult]:
    """Submit the missing images with a bounded window; collect results as they complete."""
    logger = get_run_logger()
    results: dict[str, RenderResult] = {}
    pending = deque(plan.to_generate)
    done: queue.SimpleQueue[PrefectFuture[Any]] = queue.SimpleQueue()
    keys_by_run: dict[Any, str] = {}
    pacer = Pacer(options.requests_per_minute)
    window = AdaptiveWindow(options.max_concurrency)
    abort: str | None = None
    in_flight = 0
    with _runner(options.max_concurrency, options.per_image_tasks) as runner:
        while pending or in_flight:
            while pending and abort is None and in_flight < window.limit:
                if pacer.wait_s() > 0:
                    break
                key = pending.popleft()
                job = RenderJob(
                    request=plan.unique[key],
                    destination=options.destination,
                    spill_root=options.spill_dir,
                    credentials=options.credentials,
                    aws_credentials=options.aws_credentials,
                    flow_run_id=flow_run_id,
                    concurrency_limit=options.concurrency_limit,
                )
                future = runner.submit(render_image, {"job": job})
                keys_by_run[future.task_run_id] = key
                future.add_done_callback(done.put)
                in_flight += 1
                pacer.take()
            if abort is not None and pending:
                for key in pending:
                    results[key] = RenderResult(
                        cache_key=key, finish_reason=FinishReason.ERROR, error=abort
                    )
                pending.clear()
            if not in_flight:
                continue
            wait = pacer.wait_s() if pending and in_flight < window.limit else 1.0
            try:
                future = done.get(timeout=max(wait, 0.005))
            except queue.Empty:
                continue
            in_flight -= 1
            result = _result_of(future, keys_by_run.pop(future.task_run_id))
            results[result.cache_key] = result
            window.observe(result.throttled)
            if (
                abort is None
                and result.error
                and result.error.startswith(AuthenticationError.__name__)
            ):
                abort = f"not attempted: an earlier request failed with {result.error}"
                logger.error("stopping: the API refused the credentials (%s)", result.error)
            progress.update(len(results))
    if window.decreases:
        logger.warning(
            "the API answered 429: in-flight requests were cut %d time(s), to %d at the end",
            window.decreases,
            window.limit,
        )
    return results


def _record(
    planned: PlannedImage,
    plan: BatchPlan,
    storage: Storage,
    results: Mapping[str, RenderResult],
    first: bool,
    skipped: set[str],
) -> ImageRecord:
    """One manifest line: the planned image joined with how its distinct request ended."""
    key = planned.request.cache_key
    base = {"index": planned.index, "variant": planned.variant, "item_id": planned.item_id}
    if key in plan.stored:
        stored = plan.stored[key]
        uri = storage.uri_for(stored.object_key)
        success = stored.finish_reason is FinishReason.SUCCESS
        return ImageRecord.for_request(
            planned.request,
            **base,
            finish_reason=stored.finish_reason,
            uri=uri if success else None,
            filtered_uri=None if success else uri,
            # Made with the image; if it went missing since, the contact sheet shows the image.
            thumbnail_uri=storage.uri_for(layout.thumbnail_key(key)) if success else None,
            cached=True,
            width=planned.request.size[0],
            height=planned.request.size[1],
            content_type=planned.request.content_type,
        )
    if key in skipped:
        return ImageRecord.for_request(
            planned.request,
            **base,
            finish_reason=FinishReason.SKIPPED_BUDGET,
            error="not generated: the run's budget_usd would have been exceeded",
            estimated_cost_usd=plan.cost_by_key[key] if first else 0.0,
        )
    if key not in results:  # a dry run
        return ImageRecord.for_request(
            planned.request,
            **base,
            finish_reason=FinishReason.PLANNED,
            cached=not first,
            estimated_cost_usd=plan.cost_by_key[key] if first else 0.0,
        )
    result = results[key]
    success = result.finish_reason is FinishReason.SUCCESS
    paid = first and not result.recovered_from_spill and result.finish_reason != FinishReason.ERROR
    return ImageRecord.for_request(
        planned.request,
        **base,
        finish_reason=result.finish_reason,
        uri=result.uri if success else None,
        filtered_uri=result.uri if result.finish_reason is FinishReason.CONTENT_FILTERED else None,
        thumbnail_uri=result.thumbnail_uri if success else None,
        cached=not first or result.recovered_from_spill,
        error=result.error,
        spill_path=result.spill_path,
        width=result.width,
        height=result.height,
        content_type=result.content_type,
        size_bytes=result.size_bytes,
        request_id=result.request_id,
        latency_s=result.latency_s,
        api_calls=result.api_calls if first else 0,
        estimated_cost_usd=plan.cost_by_key[key] if paid else 0.0,
    )


def _records(
    plan: BatchPlan, storage: Storage, results: Mapping[str, RenderResult]
) -> list[ImageRecord]:
    seen: set[str] = set()
    skipped = set(plan.skipped_for_budget)
    records = []
    for planned in plan.images:
        key = planned.request.cache_key
        records.append(
            _record(planned, plan, storage, results, first=key not in seen, skipped=skipped)
        )
        seen.add(key)
    return records


def _preflight(options: BatchOptions, storage: Storage) -> None:
    """Fail before any spend: an unwritable destination or a missing key costs nothing to find."""
    storage.check_writable()
    if not options.dry_run:
        # The fallback for a failed upload must work before an image is paid for.
        SpillFolder(options.destination, options.spill_dir).check_writable()
        flux_client(options.credentials)
        if options.concurrency_limit:
            _check_concurrency_limit(options.concurrency_limit)


def _check_concurrency_limit(name: str) -> None:
    """A misspelt limit name would otherwise fail every image (or, unchecked, limit nothing)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise ValueError(
                f"concurrency_limit={name!r}: no Prefect global concurrency limit has this name; "
                f"create it with `prefect gcl create {name} --limit 8` (nothing was generated)"
            ) from None
    if not limit.active:
        get_run_logger().warning(
            "global concurrency limit %r is inactive: API calls are not limited by it", name
        )


def run_batch(rows: Sequence[PromptRow], options: BatchOptions) -> State:
    """The body shared by both flows; returns the final state carrying the BatchReport."""
    started = time.perf_counter()
    logger = get_run_logger()
    options.check()
    prices = price_table(options.prices)
    images = expand(
        rows,
        defaults=options.defaults,
        base_seed=options.seed,
        variants=options.variants,
        input_images=None
        if options.input_images is None
        else list_input_images(options.input_images, aws_credentials=options.aws_credentials),
        aws_credentials=options.aws_credentials,
    )
    storage = open_storage(options.destination, aws_credentials=options.aws_credentials)
    _preflight(options, storage)
    stored = find_stored(storage)
    plan = plan_batch(images, stored, prices=prices, budget_usd=options.budget_usd)
    logger.info(
        "%d images requested: %d distinct, %d already stored, %d to generate (est. $%.4f)%s",
        len(images),
        len(plan.unique),
        sum(1 for k in plan.unique if k in plan.stored),
        len(plan.to_generate),
        plan.estimated_cost_usd,
        f", {len(plan.skipped_for_budget)} over budget" if plan.skipped_for_budget else "",
    )
    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    flow_run_id = str(flow_run.id) if flow_run else None
    results: dict[str, RenderResult] = {}
    if not options.dry_run:
        progress = ProgressReporter(total=len(plan.to_generate))
        results = _render_all(plan, options, progress, flow_run_id)
        progress.finish()
    records = _records(plan, storage, results)
    spill = SpillFolder(options.destination, options.spill_dir)
    report = BatchReport(
        records=records,
        counts=count_outcomes(records),
        api_calls=sum(r.api_calls for r in results.values()),
        cache_hits=sum(1 for r in records if r.cached),
        manifest_uri=None,
        destination=storage.root_uri,
        spill_dir=str(spill.path),
        estimated_cost_usd=plan.estimated_cost_usd
        if options.dry_run
        else sum(
            r.estimated_cost_usd for r in records if r.finish_reason != FinishReason.SKIPPED_BUDGET
        ),
        saved_usd=plan.saved_usd,
        dry_run=options.dry_run,
        flow_run_id=flow_run_id,
    )
    manifest_problem: str | None = None
    if not options.dry_run:
        run_id = layout.new_run_id(flow_run.name if flow_run else None)
        try:
            report.manifest_uri = write_manifests(storage, run_id, records)
        except StorageError as exc:
            kept = spill.keep_manifest(run_id, manifest_bytes(records))
            manifest_problem = f"manifest NOT stored ({exc}); a copy is kept at {kept}"
            logger.error("could not store the manifest: %s; a copy is kept at %s", exc, kept)
    report.wall_time_s = time.perf_counter() - started
    if not options.dry_run:
        try:
            report.contact_sheet_uri = write_contact_sheets(storage, run_id, report)
        except (StorageError, OSError) as exc:
            logger.error("could not store the contact sheet: %s", exc)
        publish_artifacts(report, storage=storage)
    return _final_state(report, options.fail_on_error, manifest_problem)


def _final_state(
    report: BatchReport, fail_on_error: bool, manifest_problem: str | None = None
) -> State:
    counts = report.counts
    message = (
        f"{len(report.records)} images: {counts['SUCCESS']} succeeded, "
        f"{counts['CONTENT_FILTERED']} filtered, {report.cache_hits} served from cache, "
        f"{counts['ERROR']} failed, {counts['SKIPPED_BUDGET']} skipped for budget; "
        f"{report.api_calls} API calls"
    )
    if report.spilled:
        message += f"; {report.spilled} kept locally in {report.spill_dir}"
    if manifest_problem:
        message += f"; {manifest_problem}"
    if fail_on_error and (counts["ERROR"] or manifest_problem):
        return Failed(message=message, data=BatchFailedError(message, report=report))
    return Completed(message=message, data=report)


_DEFAULT_FIELDS = (
    "model",
    "aspect_ratio",
    "guidance_scale",
    "num_inference_steps",
    "output_format",
    "safety_check",
    "safety_tolerance",
    "prompt_upsampling",
)


def _options(params: Mapping[str, Any]) -> BatchOptions:
    """BatchOptions from a batch flow's own parameters, by name (both flows share them all).

    Request fields become the batch's defaults, which each prompt's overrides take precedence over.
    """
    return BatchOptions(
        destination=params["destination"],
        defaults={name: params.get(name) for name in _DEFAULT_FIELDS},
        seed=params["seed"],
        variants=params["variants"],
        max_concurrency=params["max_concurrency"],
        requests_per_minute=params["requests_per_minute"],
        credentials=params["credentials"],
        aws_credentials=params["aws_credentials"],
        dry_run=params["dry_run"],
        budget_usd=params["budget_usd"],
        prices=params["prices"],
        spill_dir=params["spill_dir"],
        concurrency_limit=params["concurrency_limit"],
        fail_on_error=params["fail_on_error"],
        input_images=params.get("input_images"),
        per_image_tasks=params.get("per_image_tasks", False),
    )


@flux_flow(name="generate-images", persist_result=False, log_prints=True)
def generate_images(
    prompts: list[str | dict[str, Any] | ImageRequest],
    destination: str = DEFAULT_DESTINATION,
    *,
    model: str = SCHNELL,
    aspect_ratio: str = "1:1",
    seed: int | None = None,
    variants: int = 1,
    guidance_scale: float = 3.5,
    num_inference_steps: int | None = None,
    output_format: str = "jpeg",
    safety_check: bool = False,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    requests_per_minute: float | None = None,
    credentials: FireworksCredentials | None = None,
    aws_credentials: Any = None,
    dry_run: bool = False,
    budget_usd: float | None = None,
    prices: dict[str, float] | None = None,
    spill_dir: str | None = None,
    concurrency_limit: str | None = None,
    fail_on_error: bool = False,
    per_image_tasks: bool = False,
    input_images: list[str] | str | None = None,
    safety_tolerance: int | None = None,
    prompt_upsampling: bool | None = None,
) -> BatchReport:
    """Generate an image per prompt (x `variants`) into `destination`, never paying twice.

    `prompts` are strings or dicts with a "prompt" and per-prompt overrides (any ImageRequest
    field, plus an "id" carried into the manifest). `destination` is `s3://bucket/prefix` or a
    local folder. Images already in the destination are not generated again; identical requests
    in the batch are generated once. Returns a BatchReport; the run's state message says how many
    failed (set `fail_on_error=True` to make failures fail the run).

    Images run on local threads, recorded in the manifest and artifacts rather than as one
    Prefect task run each (a task run costs ~5 ms here and ~30 ms on the Prefect server, see
    benchmarks/RESULTS.md); `per_image_tasks=True` makes one task run per image, and any other
    task runner (such as a DaskTaskRunner) always does.

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
    options = _options(locals())
    return run_batch(normalize_prompts(prompts), options)  # type: ignore[return-value]


@flux_flow(name="generate-images-from-file", persist_result=False, log_prints=True)
def generate_images_from_file(
    source: str,
    destination: str = DEFAULT_DESTINATION,
    *,
    model: str = SCHNELL,
    aspect_ratio: str = "1:1",
    seed: int | None = None,
    variants: int = 1,
    guidance_scale: float = 3.5,
    num_inference_steps: int | None = None,
    output_format: str = "jpeg",
    safety_check: bool = False,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    requests_per_minute: float | None = None,
    credentials: FireworksCredentials | None = None,
    aws_credentials: Any = None,
    dry_run: bool = False,
    budget_usd: float | None = None,
    prices: dict[str, float] | None = None,
    spill_dir: str | None = None,
    concurrency_limit: str | None = None,
    fail_on_error: bool = False,
    per_image_tasks: bool = False,
    input_images: list[str] | str | None = None,
    safety_tolerance: int | None = None,
    prompt_upsampling: bool | None = None,
) -> BatchReport:
    """The batch, reading prompts from a file: local path or `s3://bucket/key`.

    `.txt`: one prompt a line (blank lines and `#` comments skipped). `.csv`: a `prompt` column and
    optional per-row `model`, `aspect_ratio`, `seed`, `guidance_scale`, `num_inference_steps`,
    `safety_check`, `output_format`, `id` (and for Kontext `input_image`, `safety_tolerance`,
    `prompt_upsampling`). `.jsonl`: one object a line with the same keys. `input_images` makes it
    an edit batch, as in `generate_images`.

    Example:
        ```python
        generate_images_from_file("s3://prompts/2026-11-24.jsonl", "s3://assets/products/")
        ```
    """
    options = _options(locals())
    rows = read_prompts(source, aws_credentials=aws_credentials)
    return run_batch(rows, options)  # type: ignore[return-value]


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
            rows.append(PromptRow(fields=fields, where=f"{manifest_uri} line {number}"))
    return rows


@flux_flow(name="replay-failed", persist_result=False, log_prints=True)
def replay_failed(
    manifest_uri: str,
    destination: str | None = None,
    *,
    include_skipped: bool = False,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    requests_per_minute: float | None = None,
    credentials: FireworksCredentials | None = None,
    aws_credentials: Any = None,
    budget_usd: float | None = None,
    prices: dict[str, float] | None = None,
    spill_dir: str | None = None,
    concurrency_limit: str | None = None,
    fail_on_error: bool = False,
) -> BatchReport:
    """Re-submit exactly the ERROR (and, if asked, SKIPPED_BUDGET) records of an earlier manifest.

    Each request goes out with its original seed and parameters, so a success lands where the
    first run would have put it; a new manifest records the replay. `destination` defaults to
    the one the manifest was written into.

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
            manifest_uri=None,
            destination=target,
        )
        return Completed(message="nothing to replay", data=empty)  # type: ignore[return-value]
    options = BatchOptions(
        destination=target,
        defaults={},
        seed=None,
        variants=1,
        max_concurrency=max_concurrency,
        requests_per_minute=requests_per_minute,
        credentials=credentials,
        aws_credentials=aws_credentials,
        dry_run=False,
        budget_usd=budget_usd,
        prices=prices,
        spill_dir=spill_dir,
        concurrency_limit=concurrency_limit,
        fail_on_error=fail_on_error,
    )
    return run_batch(rows, options)  # type: ignore[return-value]
