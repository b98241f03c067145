"""Where a batch's images run: plain threads by default, Prefect task runs when asked or when the
flow has another task runner (Dask, Ray), always under the pace and the in-flight window."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import queue
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from flux_flows.errors import AuthenticationError
from flux_flows.interrupts import first_ctrl_c_stops
from flux_flows.limits import AccountLimits, SharedLimits, sharing
from flux_flows.models import FinishReason
from flux_flows.pacing import AdaptiveWindow, Pacer
from flux_flows.progress import ProgressReporter
from flux_flows.render import RenderJob, RenderResult, render_image
from flux_flows.storage.metadata import row_metadata

if TYPE_CHECKING:
    import functools

    from flux_flows.batch import PlannedImage
    from flux_flows.settings import BatchOptions

    # RenderJob with everything but the request bound: picklable, so chunks can cross to workers.
    JobFactory = functools.partial[RenderJob]


_PLAIN_IDS = itertools.count()


class Keyed(Protocol):
    """What the windowed loop needs of an item: a planned image, or a request read by a worker."""

    @property
    def cache_key(self) -> str: ...


K = TypeVar("K", bound=Keyed)


class _PlainFuture:
    """The parts of a PrefectFuture that `_render_all` uses, over a concurrent.futures.Future."""

    def __init__(self, inner: Future[Any]) -> None:
        self._inner = inner
        # Only a key for matching the result to its image: a counter, not os.urandom per image.
        self.task_run_id = next(_PLAIN_IDS)

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

    A task run cost ~4 ms of client CPU and ~30 ms of Prefect-server CPU (its task-run
    recorder writes every state change) in benchmarks/RESULTS.md's historical runs, whose raw
    output was not kept; per image, that is more than the image's own work.
    The manifest and the table artifact still record every image.
    """

    def __init__(self, max_workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="flux-render")

    def submit(self, task: Any, parameters: dict[str, Any]) -> _PlainFuture:
        # As Prefect's runner does: the flow's contexts (settings, flow run) go with the work.
        context = contextvars.copy_context()
        return _PlainFuture(self._pool.submit(lambda: context.run(task.fn, **parameters)))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


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


@task(name="render-chunk", retries=0, cache_policy=NO_CACHE, persist_result=False)
def render_chunk(chunk: Chunk) -> list[RenderResult]:
    """Render a chunk's images on threads in this worker; never raises for one image's failure."""
    results = render_windowed(
        chunk.images,
        chunk.job_for,
        max_concurrency=chunk.max_concurrency,
        requests_per_minute=chunk.requests_per_minute,
        runner=_PlainRunner(chunk.max_concurrency),
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
    chunks as flow runs on a work pool (see `pools`), staged under `work_dir`. `on_results` sees each
    batch of finished results (a chunk, or every few hundred images) so records can be written
    as the run goes.
    """
    if options.chunk_deployment:
        from flux_flows.pools import render_on_pool

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
                runner = _PlainRunner(options.max_concurrency)
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
    futures = {runner.submit(render_chunk, {"chunk": chunk}): chunk for chunk in chunks}
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


INTERRUPTED = "not attempted: the run was interrupted (Ctrl-C)"


# Put into a loop's queue of finished futures when its shared limits granted slots or tokens.
_WAKE = object()


def _without_slot(job_for: Callable[[K], RenderJob], held: str) -> Callable[[K], RenderJob]:
    """The jobs of a loop that holds `held` itself: they must not take a slot of it per call."""

    def job(item: K) -> RenderJob:
        made = job_for(item)
        if made.concurrency_limit == held:
            return dataclasses.replace(made, concurrency_limit=None)
        return made

    return job


def _holder() -> str | None:
    context = FlowRunContext.get()
    run = context.flow_run if context else None
    return str(run.id) if run else None


def render_windowed(
    items: Sequence[K],
    job_for: Callable[[K], RenderJob],
    *,
    max_concurrency: int,
    requests_per_minute: float | None,
    runner: Any,
    progress: ProgressReporter | None = None,
    on_results: Callable[[list[RenderResult]], None] = lambda results: None,
    flush_every: int = 200,
    limits: AccountLimits | None = None,
) -> dict[str, RenderResult]:
    """Submit images with a bounded, adaptive window and an even pace; collect as they finish.

    With `limits`, the user's account-wide limits are held for the loop's life (`limits`
    module): a request is submitted only while the loop holds a slot and a rate token for it.
    """
    done: queue.SimpleQueue[Any] = queue.SimpleQueue()
    with sharing(limits, max_concurrency, lambda: done.put(_WAKE), _holder()) as shared:
        if shared is not None and shared.concurrency:
            job_for = _without_slot(job_for, shared.concurrency)
        return _windowed(
            items,
            job_for,
            done,
            shared,
            max_concurrency=max_concurrency,
            requests_per_minute=requests_per_minute,
            runner=runner,
            progress=progress,
            on_results=on_results,
            flush_every=flush_every,
        )


def _windowed(
    items: Sequence[K],
    job_for: Callable[[K], RenderJob],
    done: queue.SimpleQueue[Any],
    shared: SharedLimits | None,
    *,
    max_concurrency: int,
    requests_per_minute: float | None,
    runner: Any,
    progress: ProgressReporter | None,
    on_results: Callable[[list[RenderResult]], None],
    flush_every: int,
) -> dict[str, RenderResult]:
    logger = get_run_logger()
    results: dict[str, RenderResult] = {}
    unflushed: list[RenderResult] = []
    pending = deque(items)
    keys_by_run: dict[Any, str] = {}
    pacer = Pacer(requests_per_minute)
    window = AdaptiveWindow(max_concurrency)
    abort: str | None = None
    in_flight = 0
    with first_ctrl_c_stops() as pressed:
        while pending or in_flight:
            if pressed.is_set() and abort != INTERRUPTED:
                # Ctrl-C: stop submitting, let what is in flight (paid for) finish and be
                # stored, so the manifest records it; a second Ctrl-C aborts at once.
                abort = INTERRUPTED
                logger.warning(
                    "interrupted: no new images; waiting for %d in flight (Ctrl-C again to abort)",
                    in_flight,
                )
            if shared is not None:
                if abort is None and shared.error:
                    abort = f"not attempted: {shared.error}"
                    logger.error("stopping: %s", shared.error)
                live = len(pending) if abort is None else 0
                shared.want(in_flight, min(window.limit, in_flight + live), live)
            blocked = False  # on the shared limits: woken by _WAKE, not by a timer
            while pending and abort is None and in_flight < window.limit:
                if pacer.wait_s() > 0:
                    break
                if shared is not None and not shared.may_send(in_flight):
                    blocked = True
                    break
                item = pending.popleft()
                future = runner.submit(render_image, {"job": job_for(item)})
                keys_by_run[future.task_run_id] = item.cache_key
                future.add_done_callback(done.put)
                in_flight += 1
                pacer.take()
                if shared is not None:
                    shared.sent()
            if abort is not None and pending:
                for item in pending:
                    result = RenderResult(
                        cache_key=item.cache_key, finish_reason=FinishReason.ERROR, error=abort
                    )
                    results[item.cache_key] = result
                    unflushed.append(result)
                pending.clear()
            if not in_flight and not pending:
                continue
            free = pending and in_flight < window.limit and not blocked
            wait = pacer.wait_s() if free else 1.0
            try:
                future = done.get(timeout=max(wait, 0.005))
            except queue.Empty:
                continue
            if future is _WAKE:
                continue

            in_flight -= 1
            result = _result_of(future, keys_by_run.pop(future.task_run_id))
            results[result.cache_key] = result
            unflushed.append(result)
            window.observe(result.throttled)
            if (
                abort is None
                and result.error
                and result.error.startswith(AuthenticationError.__name__)
            ):
                abort = f"not attempted: an earlier request failed with {result.error}"
                logger.error("stopping: the API refused the credentials (%s)", result.error)
            if len(unflushed) >= flush_every:
                on_results(unflushed)
                unflushed = []
            if progress is not None and not result.taken_by:
                progress.add(1)
    if unflushed:
        on_results(unflushed)
    if window.decreases:
        logger.warning(
            "the API answered 429: in-flight requests were cut %d time(s), to %d at the end",
            window.decreases,
            window.limit,
        )
    if shared is not None:
        logger.debug(
            "shared limits: %d Prefect call(s), at most %s slot(s) held",
            shared.calls,
            shared.max_held,
        )
    return results
