"""A Prefect progress artifact updated while a batch runs, throttled so it costs ~nothing.

One artifact per run, updated at most every `min_interval_s` and every `min_step` percent, so a
10,000-image run makes a few dozen API calls for its progress bar, not 10,000.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger("flux_flows.rendering.progress")

Listener = Callable[[int, int], None]
_listeners: list[Listener] = []
StatusListener = Callable[[str], None]
_status_listeners: list[StatusListener] = []


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call `listener(done, total)` on every completed image while inside; the CLI's progress bar."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


@contextlib.contextmanager
def listening_status(listener: StatusListener) -> Iterator[None]:
    """Call `listener(text)` whenever the batch says what it is doing besides rendering (waiting
    for another run, say); "" means it is rendering again. The CLI shows it beside its bar."""
    _status_listeners.append(listener)
    try:
        yield
    finally:
        _status_listeners.remove(listener)


def say_status(text: str) -> None:
    for listener in list(_status_listeners):
        listener(text)


class ProgressReporter:
    def __init__(self, total: int, *, min_interval_s: float = 2.0, min_step: float = 5.0) -> None:
        self.total = total
        self.min_interval_s = min_interval_s
        self.min_step = min_step
        self.updates = 0
        self.done = 0
        self._artifact_id = None
        self._last_percent = 0.0
        self._last_at = 0.0
        for listener in list(_listeners):
            listener(0, total)  # the bar knows its total before the first image lands
        if total:
            self._artifact_id = self._create()

    def _create(self) -> object | None:
        from prefect.artifacts import create_progress_artifact

        try:
            return create_progress_artifact(
                progress=0.0,
                key="flux-flows-progress",
                description=f"Images generated and stored, of {self.total}",
            )
        except Exception as exc:  # a progress bar must never stop paid work
            logger.warning("could not create the progress artifact: %s", exc)
            return None

    def add(self, settled: int) -> None:
        """Count images that reached their end (stored, filtered, failed), across every pass of
        the run; an image another run holds is not one of them until it is found or made."""
        self.done += settled
        if settled:
            self.update(self.done)

    def update(self, done: int, *, force: bool = False) -> None:
        for listener in list(_listeners):
            listener(done, self.total)
        if self._artifact_id is None or not self.total:
            return
        percent = min(100.0, 100.0 * done / self.total)
        now = time.monotonic()
        due = (
            percent - self._last_percent >= self.min_step
            and now - self._last_at >= self.min_interval_s
        )
        if not (force or due) or percent == self._last_percent:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            # Prefect types artifact_id as UUID; the id it gave us back is the same value.
            update_progress_artifact(artifact_id=self._artifact_id, progress=percent)  # type: ignore[arg-type]
        except Exception as exc:
            logger.warning("could not update the progress artifact: %s", exc)
            return
        self.updates += 1
        self._last_percent, self._last_at = percent, now

    def finish(self) -> None:
        self.update(self.total, force=True)
