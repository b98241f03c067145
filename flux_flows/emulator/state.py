"""What lasts between requests: the fault RNG, `[[flaky:N]]` counts, the requests-per-minute
window and submitted Kontext tasks. One lock guards it all, so deciding whether a request is
served is atomic and tests can reconfigure or reset a running emulator from another thread.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from flux_flows.emulator.config import (
    KONTEXT_MAX_TASKS,
    RATE_WINDOW_S,
    EmulatorConfig,
    EmulatorStats,
    apply_changes,
)
from flux_flows.emulator.errors import ApiError, retry_after_headers
from flux_flows.emulator.markers import Markers
from flux_flows.emulator.parsing import KontextJob, ParsedRequest


def monotonic_now() -> float:
    """Clock of the rate-limit window; a module function so tests can move time without sleeping."""
    return time.monotonic()


@dataclass
class KontextTask:
    """One submitted Kontext task. Its status is decided when polled (see `EmulatorState.poll`);
    the picture is rendered on first download and kept until the task is forgotten."""

    id: str
    job: KontextJob
    seed: int
    markers: Markers
    created: float
    results_origin: str
    polls: int = 0
    billed: bool = False
    ready: bool = False
    input_bytes: bytes | None = field(default=None, repr=False)
    image: bytes | None = field(default=None, repr=False)

    @property
    def extension(self) -> str:
        return "jpg" if self.job.output_format == "jpeg" else "png"

    def generation_key(self) -> tuple[Any, ...]:
        job = self.job
        return (
            job.model,
            job.prompt,
            self.seed,
            job.aspect_ratio,
            job.input_hash,
            job.safety_tolerance,
            job.prompt_upsampling,
            job.output_format,
        )


def _poll_body(
    task_id: str,
    status: str,
    *,
    result: dict[str, Any] | None = None,
    progress: float | None = None,
    details: Any = None,
) -> dict[str, Any]:
    """Every poll answer has the same keys; `result` is null until Ready."""
    return {
        "id": task_id,
        "status": status,
        "result": result,
        "progress": progress,
        "details": details,
    }


class EmulatorState:
    """What changes between requests; locked because tests reset it from other threads."""

    def __init__(self, config: EmulatorConfig, stats: EmulatorStats) -> None:
        self.config = config
        self.stats = stats
        self._lock = threading.Lock()
        self._rng = random.Random(config.fault_seed)
        self._flaky: Counter[tuple[str, int]] = Counter()
        self._window: deque[float] = deque()
        self._tasks: dict[str, KontextTask] = {}

    def configure(self, changes: dict[str, Any]) -> None:
        with self._lock:
            apply_changes(self.config, changes)
            if "fault_seed" in changes:
                self._rng = random.Random(self.config.fault_seed)

    def reset(self) -> None:
        """Back to a fresh emulator: counters, flaky memory, rate window, fault RNG."""
        with self._lock:
            self._rng = random.Random(self.config.fault_seed)
            self._flaky.clear()
            self._window.clear()
            self._tasks.clear()
        self.stats.reset()

    def add_task(self, task: KontextTask) -> None:
        """Remember a task; the oldest are forgotten beyond KONTEXT_MAX_TASKS (results expire)."""
        with self._lock:
            self._tasks[task.id] = task
            while len(self._tasks) > KONTEXT_MAX_TASKS:
                self._tasks.pop(next(iter(self._tasks)))

    def poll(self, model: str, task_id: str) -> dict[str, Any]:
        """The status of a task now: decided from its markers, its age and its prompt."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.job.model != model:
                return _poll_body(task_id, "Task not found")
            task.polls += 1
            markers = task.markers
            if task.polls <= markers.not_found_first:
                return _poll_body(task_id, "Task not found")
            if markers.kontext == "request-moderated":
                task.input_bytes = None
                reasons = {"moderation_reasons": ["input refused ([[kontext:request-moderated]])"]}
                return _poll_body(task_id, "Request Moderated", details=reasons)
            pending_s = self.config.kontext_pending_s
            age = monotonic_now() - task.created
            if age < pending_s:
                return _poll_body(task_id, "Pending", progress=round(age / pending_s, 2))
            if markers.kontext == "error":
                task.input_bytes = None
                details = {"message": "the task failed in the emulator ([[kontext:error]])"}
                return _poll_body(task_id, "Error", details=details)
            if not task.billed:
                task.billed = True
                self.stats.record_generation(task.generation_key())
            lowered = task.job.prompt.lower()
            words = [w for w in self.config.filter_words if w and w.lower() in lowered]
            if words:
                task.input_bytes = None
                reasons = {"moderation_reasons": [f"filtered word: {w}" for w in words]}
                return _poll_body(task_id, "Content Moderated", progress=1.0, details=reasons)
            task.ready = True
            sample = f"{task.results_origin}/_emulator/results/{task.id}.{task.extension}"
            result = {"sample": sample, "seed": task.seed}
            return _poll_body(task_id, "Ready", result=result, progress=1.0)

    def ready_task(self, name: str) -> KontextTask | None:
        """The task whose result `name` (`<id>.<ext>`) is, if it has been seen Ready."""
        task_id, _, extension = name.rpartition(".")
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None or not task.ready or task.extension != extension:
            return None
        return task

    def admit(self, gen: ParsedRequest | KontextJob, markers: Markers) -> dict[str, str]:
        """Decide, atomically, whether this request is served; returns its rate-limit headers.

        Order: rate window, then flaky marker, then random faults. Only admitted requests take a
        slot in the window, as the contract's window counts accepted generations.
        """
        with self._lock:
            limit_headers = self._check_window()
            busy = self.config.max_concurrent
            if busy is not None and self.stats.in_flight > busy:
                raise ApiError(
                    429,
                    f"Too many concurrent requests (more than {busy}); slow down.",
                    headers=retry_after_headers(self.config),
                )
            if markers.flaky:
                key = (gen.prompt, gen.seed)
                self._flaky[key] += 1
                if self._flaky[key] <= markers.flaky:
                    raise ApiError(503, "The service is temporarily unavailable (flaky marker).")
            self._random_fault()
            if self.config.rpm_limit is not None:
                self._window.append(monotonic_now())
                limit_headers = self._limit_headers(over=False)
            return limit_headers

    def _check_window(self) -> dict[str, str]:
        limit = self.config.rpm_limit
        if limit is None:
            return {}
        now = monotonic_now()
        while self._window and self._window[0] <= now - RATE_WINDOW_S:
            self._window.popleft()
        if len(self._window) >= limit:
            wait = max(1, math.ceil(self._window[0] + RATE_WINDOW_S - now))
            headers = {**self._limit_headers(over=True), "Retry-After": str(wait)}
            raise ApiError(
                429, f"Request rate limit of {limit} requests per minute exceeded.", headers=headers
            )
        return self._limit_headers(over=False)

    def _limit_headers(self, *, over: bool) -> dict[str, str]:
        limit = self.config.rpm_limit or 0
        return {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(max(0, limit - len(self._window))),
            "x-ratelimit-over-limit": "yes" if over else "no",
        }

    def _random_fault(self) -> None:
        config = self.config
        if config.rate_429 <= 0 and config.rate_5xx <= 0:
            return
        draw = self._rng.random()
        if draw < config.rate_429:
            raise ApiError(
                429, "Too many requests, please slow down.", headers=retry_after_headers(config)
            )
        if draw < config.rate_429 + config.rate_5xx:
            raise ApiError(config.status_5xx)
