"""Adaptive slow-down: a batch that meets 429s narrows its window and still finishes every image."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from flux_flows.flows import generate_images
from flux_flows.rendering.pacing import AdaptiveWindow, Pacer


def test_window_halves_on_throttle_and_regrows_additively() -> None:
    window = AdaptiveWindow(8, cooldown_s=0.0)
    window.observe(throttled=1)
    assert window.limit == 4
    window.observe(throttled=2)
    assert window.limit == 2
    window.observe(throttled=0)
    assert window.limit == 2  # one clean answer is not a window's worth
    for _ in range(2):
        window.observe(throttled=0)
    assert window.limit == 3  # about one more slot per window's worth of clean answers
    for _ in range(100):
        window.observe(throttled=0)
    assert window.limit == 8  # never above the maximum
    assert window.decreases == 2


def test_window_cuts_once_per_cooldown_and_never_below_one() -> None:
    window = AdaptiveWindow(4, cooldown_s=3600)
    for _ in range(5):
        window.observe(throttled=1)
    assert window.limit == 2 and window.decreases == 1
    tiny = AdaptiveWindow(1, cooldown_s=0.0)
    tiny.observe(throttled=1)
    assert tiny.limit == 1


def test_pacer_spaces_requests_under_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]  # the pacer's clock, moved by the test: no timing of the machine's own
    monkeypatch.setattr("flux_flows.rendering.pacing.time.monotonic", lambda: clock[0])
    pacer = Pacer(600)
    assert pacer.wait_s() == 0
    pacer.take()
    assert pacer.wait_s() == pytest.approx(60 / (600 * 0.98))  # 600/min with 2% headroom
    clock[0] += 0.05
    assert pacer.wait_s() == pytest.approx(60 / (600 * 0.98) - 0.05)
    clock[0] += 1.0  # late by many intervals: the schedule restarts with one catch-up at most
    assert pacer.wait_s() == 0
    pacer.take()
    assert pacer.wait_s() == 0  # the one catch-up
    pacer.take()
    assert pacer.wait_s() == pytest.approx(60 / (600 * 0.98))
    assert Pacer(None).wait_s() == 0


def test_batch_under_429_storm_finishes_and_slows_down(
    tmp_path: Path, flow_env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The account takes 3 requests at a time; the batch starts with 12 in flight.
    # No Retry-After: the client's own jittered exponential backoff spreads the retries.
    flow_env.configure(max_concurrent=3, retry_after_s=None, latency_s=0.1)
    caplog.set_level(logging.WARNING)
    report = generate_images([f"storm {i}" for i in range(30)], str(tmp_path), max_concurrency=12)
    assert report.counts["SUCCESS"] == 30
    assert report.api_calls > 24  # the 429s were retried...
    assert flow_env.stats.generations == 30  # ...and nothing was paid twice
    assert "in-flight requests were cut" in caplog.text
