"""Where a batch's images run: plain threads by default, Prefect task runs when asked or when the
flow has another task runner (Dask, Ray), always under the pace and the in-flight window."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flux_flows.models import FinishReason
from flux_flows.rendering.limit_settings import AccountLimits
from flux_flows.rendering.one_image import RenderJob, RenderResult
from flux_flows.rendering.progress import ProgressReporter
from flux_flows.rendering.window import PlainRunner, render_windowed
from flux_flows.rendering.work_pools import render_on_pool
from flux_flows.storage.metadata import row_metadata

if TYPE_CHECKING:
    import functools

    from flux_flows.planning.plan import PlannedImage
    from flux_flows.settings import BatchOptions

    # RenderJob with everything but the request bound: picklable, so chunks can cross to workers.
    JobFactory = functools.partial[RenderJob]


@dataclass(frozen=True)
class Chunk:
    """A slice of the plan for one worker: hundreds of images, one Prefect task run.

    A task run per image costs more than the image's own work once it crosses to a Dask worker
    (~360 ms of cluster CPU each in an early measurement that benchmarks/RESULTS.md does not
    hold: not reproducible from this repository); a chunk pays that once
    and renders its images on threads there, through the same windowed loop as one process.
    Its share of the batch's window and pace keeps the whole batch inside the limits as long
    as at most `parallel` chunks run at once.
    """

    number: int
    images: tuple[PlannedImage, ...]
    make_job: JobFactory
    max_concurrency: int
    requests_per_minute: float | None
    limits: AccountLimits | None = None  # the user's shared limits, held by the chunk for its life

    def job_for(self, planned: PlannedImage) -> RenderJob:
        return self.make_job(
            request=planned.request,
            known_key=planned.cache_key,
            row=row_metadata(planned.item_id, planned.columns),
        )


@task(name="render-chunk-task", retries=0, cache_policy=NO_CACHE, persist_result=False)
def render_chunk_task(chunk: Chunk) -> list[RenderResult]:
    """Render a chunk's images on threads in this worker; never raises for one image's failure."""
    results = render_windowed(
        chunk.images,
        chunk.job_for,
        max_concurrency=chunk.max_concurrency,
        requests_per_minute=chunk.requests_per_minute,
        runner=PlainRunner(chunk.max_concurrency),
        limits=chunk.limits,
    )
    return list(results.values())


def _parallel_slots(runner: Any, chunks: int) -> int:
    """How many chunks can run at once: a Dask cluster's threads, else every chunk (the safe
    bound: each then gets the smallest share of the limits)."""
    client = getattr(runner, "client", None)
    nthreads = getattr(client, "nthreads", None)
    if callable(nthreads):
        with contextlib.suppress(Exception):
            return max(1, min(chunks, sum(nthreads().values())))
    return max(1, chunks)


def chunks_of(
    images: Sequence[PlannedImage], options: BatchOptions, make_job: JobFactory, parallel: int
) -> list[Chunk]:
    """Cut the plan into at most `chunk_size` images a chunk, and at least one chunk a slot."""
    size = max(1, min(options.chunk_size, -(-len(images) // parallel)))
    share = max(1, options.max_concurrency // parallel)
    rpm = options.requests_per_minute / parallel if options.requests_per_minute else None
    limits = account_limits(options)
    return [
        Chunk(n, tuple(images[start : start + size]), make_job, share, rpm, limits)
        for n, start in enumerate(range(0, len(images), size), start=1)
    ]


def render_all(
    images: Sequence[PlannedImage],
    options: BatchOptions,
    progress: ProgressReporter,
    make_job: JobFactory,
    on_results: Callable[[list[RenderResult]], None] = lambda results: None,
    work_dir: str = "",
) -> dict[str, RenderResult]:
    """Every missing image, rendered where the flow's task runner says.

    Local threads (the default): one windowed loop, no task runs. `per_image_tasks`: a task run
    per image. Any other runner (Dask, Ray): chunks, one task run each. `chunk_deployment`:
    chunks as flow runs on a work pool (see `rendering.work_pools`), staged under `work_dir`. `on_results` sees each
    batch of finished results (a chunk, or every few hundred images) so records can be written
    as the run goes.
    """
    if options.chunk_deployment:
        return render_on_pool(images, options, progress, make_job, on_results, work_dir)
    context = FlowRunContext.get()
    chosen = context.task_runner if context else None
    local = chosen is None or isinstance(chosen, ThreadPoolTaskRunner)
    if options.per_image_tasks or local:
        with contextlib.ExitStack() as stack:
            if not local:
                runner: Any = chosen
            elif options.per_image_tasks:
                runner = stack.enter_context(ThreadPoolTaskRunner(options.max_concurrency))
            else:
                runner = PlainRunner(options.max_concurrency)
                stack.callback(runner.shutdown)
            return render_windowed(
                images,
                lambda planned: make_job(
                    request=planned.request,
                    known_key=planned.cache_key,
                    row=row_metadata(planned.item_id, planned.columns),
                ),
                max_concurrency=options.max_concurrency,
                requests_per_minute=options.requests_per_minute,
                runner=runner,
                progress=progress,
                on_results=on_results,
                limits=account_limits(options),
            )
    _warn_without_a_shared_api()
    chunks = chunks_of(images, options, make_job, _parallel_slots(chosen, len(images)))
    return _render_chunks(chunks, chosen, progress, on_results)


def account_limits(options: BatchOptions) -> AccountLimits | None:
    """The user's shared limits named in the options, if any."""
    limits = AccountLimits(options.concurrency_limit, options.rate_limit)
    return limits or None


def _warn_without_a_shared_api() -> None:
    """With no Prefect API configured, each Dask worker process would start a temporary Prefect
    server of its own (and may leave it behind): say what to set instead of letting it happen
    silently."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    get_run_logger().warning(
        "no Prefect API is configured (PREFECT_API_URL): every worker of this task runner "
        "starts a temporary Prefect server of its own. Point the batch and its workers at one "
        'server first, e.g. `eval "$(flux-flows server env)"` in the shell that starts them.'
    )


def _render_chunks(
    chunks: list[Chunk],
    runner: Any,
    progress: ProgressReporter,
    on_results: Callable[[list[RenderResult]], None],
) -> dict[str, RenderResult]:
    futures = {runner.submit(render_chunk_task, {"chunk": chunk}): chunk for chunk in chunks}
    results: dict[str, RenderResult] = {}
    for future in as_completed(list(futures)):
        chunk = futures[future]
        value = future.result(raise_on_failure=False)
        if isinstance(value, list):
            finished = value
        else:  # the worker died or the task crashed: its images are unknown, record them failed
            error = f"the chunk's worker failed: {value}"
            finished = [
                RenderResult(cache_key=r.cache_key, finish_reason=FinishReason.ERROR, error=error)
                for r in chunk.images
            ]
        results.update((r.cache_key, r) for r in finished)
        on_results(finished)
        progress.add(sum(1 for r in finished if not r.taken_by))
    return results
