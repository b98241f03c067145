"""Where a batch's images run: plain threads by default, Prefect task runs when asked or when the
flow has another task runner (Dask, Ray), always under the pace and the in-flight window."""

from __future__ import annotations

import contextlib
import contextvars
import queue
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from flux_flows.batch import BatchPlan
from flux_flows.errors import AuthenticationError
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.pacing import AdaptiveWindow, Pacer
from flux_flows.progress import ProgressReporter
from flux_flows.render import RenderJob, RenderResult, render_image

if TYPE_CHECKING:
    from flux_flows.settings import BatchOptions


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


def render_all(
    plan: BatchPlan,
    options: BatchOptions,
    progress: ProgressReporter,
    job_for: Callable[[ImageRequest], RenderJob],
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
                job = job_for(plan.unique[key])
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
