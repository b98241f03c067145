"""Wall time and client CPU of one measured run, taken the same way by every contender."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from harness.cpu import client_cpu_s


@dataclass
class Timing:
    """Filled in when the `timed` block ends; `started_at`/`ended_at` are epoch seconds."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    started: float = 0.0  # perf_counter at the start, for runs compared across processes


@contextlib.contextmanager
def timed(extra: Iterable[int] = (), exclude: Iterable[int] = ()) -> Iterator[Timing]:
    """Time the block: wall clock, and client CPU as `harness.cpu.client_cpu_s` defines it."""
    extra, exclude = list(extra), list(exclude)
    out = Timing()
    cpu0 = client_cpu_s(extra, exclude)
    out.started_at, out.started = time.time(), time.perf_counter()
    yield out
    out.wall_s = time.perf_counter() - out.started
    out.cpu_s = client_cpu_s(extra, exclude) - cpu0
    out.ended_at = time.time()
