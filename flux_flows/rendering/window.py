"""The in-flight window: images submitted under a bounded, adaptive window and an even pace,
collected as they finish, whatever runs them (plain threads, Prefect task runs, a chunk's threads
on a Dask worker or a work-pool worker).

Kept apart from `dispatch` (which decides where images run) so that the work-pool chunk flow and
the one-process path share this loop without importing each other.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import queue
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.states import State

from flux_flows.errors import AuthenticationError
from flux_flows.models import FinishReason
from flux_flows.rendering.interrupts import first_ctrl_c_stops
from flux_flows.rendering.limit_settings import AccountLimits
from flux_flows.rendering.limits import SharedLimits, sharing
from flux_flows.rendering.one_image import RenderJob, RenderResult, render_image
from flux_flows.rendering.pacing import AdaptiveWindow, Pacer
from flux_flows.rendering.progress import ProgressReporter

__all__ = ["INTERRUPTED", "Keyed", "PlainRunner", "render_windowed"]

INTERRUPTED = "not attempted: the run was interrupted (Ctrl-C)"

_PLAIN_IDS = itertools.count()
# Put into a loop's queue of finished futures when its shared limits granted slots or tokens.
_WAKE = object()


class Keyed(Protocol):
    """What the windowed loop needs of an item: a planned image, or a request read by a worker."""

    @property
    def cache_key(self) -> str: ...


K = TypeVar("K", bound=Keyed)


class _PlainFuture:
    """The parts of a PrefectFuture that the loop uses, over a concurrent.futures.Future."""

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


class PlainRunner:
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


def result_of(future: Any, cache_key: str) -> RenderResult:
    """A finished future's RenderResult; an exception or a crashed task becomes an ERROR one."""
    value = future.result(raise_on_failure=False)
    if isinstance(value, RenderResult):
        return value
    error = value if isinstance(value, BaseException) else RuntimeError(str(value))
    return RenderResult(
        cache_key=cache_key,
        finish_reason=FinishReason.ERROR,
        error=f"{type(error).__name__}: {error}",
    )


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
        loop = _Loop(items, job_for, done, shared, runner, progress, on_results, flush_every)
        loop.pacer = Pacer(requests_per_minute)
        loop.window = AdaptiveWindow(max_concurrency)
        return loop.run()


class _Loop(Generic[K]):
    """One windowed loop's state; each step of a turn is a method so the turn reads as a list."""

    def __init__(
        self,
        items: Sequence[K],
        job_for: Callable[[K], RenderJob],
        done: queue.SimpleQueue[Any],
        shared: SharedLimits | None,
        runner: Any,
        progress: ProgressReporter | None,
        on_results: Callable[[list[RenderResult]], None],
        flush_every: int,
    ) -> None:
        self.job_for, self.done, self.shared, self.runner = job_for, done, shared, runner
        self.progress, self.on_results, self.flush_every = progress, on_results, flush_every
        self.pending: deque[K] = deque(items)
        self.results: dict[str, RenderResult] = {}
        self.unflushed: list[RenderResult] = []
        self.keys_by_run: dict[Any, str] = {}
        self.pacer = Pacer(None)
        self.window = AdaptiveWindow(1)
        self.abort: str | None = None
        self.in_flight = 0
        self.logger = get_run_logger()

    def run(self) -> dict[str, RenderResult]:
        with first_ctrl_c_stops() as pressed:
            while self.pending or self.in_flight:
                if pressed.is_set() and self.abort != INTERRUPTED:
                    # Ctrl-C: stop submitting, let what is in flight (paid for) finish and be
                    # stored, so the manifest records it; a second Ctrl-C aborts at once.
                    self.abort = INTERRUPTED
                    self.logger.warning(
                        "interrupted: no new images; waiting for %d in flight "
                        "(Ctrl-C again to abort)",
                        self.in_flight,
                    )
                self._ask_shared_limits()
                blocked = self._submit_what_fits()
                self._give_up_pending()
                if self.in_flight or self.pending:
                    self._collect_one(blocked)
        if self.unflushed:
            self.on_results(self.unflushed)
        self._log_end()
        return self.results

    def _ask_shared_limits(self) -> None:
        shared = self.shared
        if shared is None:
            return
        if self.abort is None and shared.error:
            self.abort = f"not attempted: {shared.error}"
            self.logger.error("stopping: %s", shared.error)
        live = len(self.pending) if self.abort is None else 0
        shared.want(self.in_flight, min(self.window.limit, self.in_flight + live), live)

    def _submit_what_fits(self) -> bool:
        """Submit while the window, the pace and the shared limits allow; True if the shared
        limits said no (the loop is then woken by _WAKE, not by a timer)."""
        while self.pending and self.abort is None and self.in_flight < self.window.limit:
            if self.pacer.wait_s() > 0:
                return False
            if self.shared is not None and not self.shared.may_send(self.in_flight):
                return True
            item = self.pending.popleft()
            future = self.runner.submit(render_image, {"job": self.job_for(item)})
            self.keys_by_run[future.task_run_id] = item.cache_key
            future.add_done_callback(self.done.put)
            self.in_flight += 1
            self.pacer.take()
            if self.shared is not None:
                self.shared.sent()
        return False

    def _give_up_pending(self) -> None:
        """Once the loop aborts, every image not yet submitted is recorded as not attempted."""
        if self.abort is None or not self.pending:
            return
        for item in self.pending:
            self._finish(
                RenderResult(
                    cache_key=item.cache_key, finish_reason=FinishReason.ERROR, error=self.abort
                )
            )
        self.pending.clear()

    def _collect_one(self, blocked: bool) -> None:
        free = self.pending and self.in_flight < self.window.limit and not blocked
        wait = self.pacer.wait_s() if free else 1.0
        try:
            future = self.done.get(timeout=max(wait, 0.005))
        except queue.Empty:
            return
        if future is _WAKE:
            return
        self.in_flight -= 1
        result = result_of(future, self.keys_by_run.pop(future.task_run_id))
        self._finish(result)
        self.window.observe(result.throttled)
        if (
            self.abort is None
            and result.error
            and result.error.startswith(AuthenticationError.__name__)
        ):
            self.abort = f"not attempted: an earlier request failed with {result.error}"
            self.logger.error("stopping: the API refused the credentials (%s)", result.error)
        if len(self.unflushed) >= self.flush_every:
            self.on_results(self.unflushed)
            self.unflushed = []
        if self.progress is not None and not result.taken_by:
            self.progress.add(1)

    def _finish(self, result: RenderResult) -> None:
        self.results[result.cache_key] = result
        self.unflushed.append(result)

    def _log_end(self) -> None:
        if self.window.decreases:
            self.logger.warning(
                "the API answered 429: in-flight requests were cut %d time(s), to %d at the end",
                self.window.decreases,
                self.window.limit,
            )
        if self.shared is not None:
            self.logger.debug(
                "shared limits: %d Prefect call(s), at most %s slot(s) held",
                self.shared.calls,
                self.shared.max_held,
            )
