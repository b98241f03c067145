"""Staying a good citizen of the API: an even pace under a requests-per-minute limit, and an
in-flight window that halves on 429s and regrows as answers come back clean."""

from __future__ import annotations

import time

# Pace a little under the stated limit: the account's window and our clock never agree exactly.
RPM_HEADROOM = 0.98


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
