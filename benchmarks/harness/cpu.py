"""CPU and memory accounting: the one definition every benchmark uses.

**A process tree's CPU** (`tree_cpu_s`) is user+system seconds, read with psutil, of the process,
of every live descendant, and of the descendants that already ended and were waited for (the
kernel adds those to their parent's `children_user`/`children_system`). So a work-pool worker's
flow-run processes, a restarted Dask worker or a reaped child still count; subtrees named in
`exclude` do not. This process is read from its own clock (`time.process_time`, `getrusage`: ns
and µs resolution), others from /proc (clock ticks, 10 ms).

**Client CPU** (`client_cpu_s`) is the tree CPU of the process that runs a contender, plus the
trees of any other processes that belong to it (`extra`), minus the trees that are not the
contender's (`exclude`: the servers an orchestrator started, the py-spy sampler). A flux-flows
child that starts no process gets exactly its own CPU time, all threads (`time.process_time`);
a Dask child gets its nanny and worker processes too.

**Server CPU** is the tree CPU of the server's pid (the Prefect server's workers included).

Take both around the measured run only, and read the Prefect server after `settle` (it records
task runs from events that arrive after the client is done).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

SETTLE_MAX_S = 120.0  # the longest a server is waited on to go quiet after a run


def tree_cpu_s(pid: int, exclude: Iterable[int] = ()) -> float:
    """User+system seconds of `pid`'s tree, ended descendants included; 0 if it is gone."""
    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
    except psutil.Error:
        return 0.0
    skipped = set(exclude)
    for proc in descendants:
        if proc.pid in skipped:
            with contextlib.suppress(psutil.Error):
                skipped.update(p.pid for p in proc.children(recursive=True))
    total = _own_cpu_s(root)
    for proc in descendants:
        if proc.pid not in skipped:
            total += _own_cpu_s(proc)
    return total


def _own_cpu_s(proc: psutil.Process) -> float:
    """One process and its reaped children, at the best resolution the kernel gives.

    This process's own clock (`time.process_time`, `getrusage`) has nanosecond to microsecond
    resolution, where /proc (psutil) counts clock ticks (10 ms): a figure of microseconds per
    call needs the former.
    """
    if proc.pid == os.getpid():
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system + t.children_user + t.children_system


def client_cpu_s(extra: Iterable[int] = (), exclude: Iterable[int] = ()) -> float:
    """This process's tree CPU plus `extra` trees, without the `exclude` trees."""
    left_out = list(exclude)
    return tree_cpu_s(os.getpid(), left_out) + sum(tree_cpu_s(p, left_out) for p in extra)


def settle(pid: int, quiet_cpu_per_s: float = 0.05, step: float = 1.0) -> float:
    """Wait until a server's tree uses < `quiet_cpu_per_s` cores; the seconds waited."""
    started = time.perf_counter()
    last = tree_cpu_s(pid)
    while time.perf_counter() - started < SETTLE_MAX_S:
        time.sleep(step)
        now = tree_cpu_s(pid)
        if now - last < quiet_cpu_per_s * step:
            break
        last = now
    return time.perf_counter() - started


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_kb() -> int:
    """Current resident set, kB (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    return 0


def max_rss_kb() -> int:
    """Peak resident set of this process so far, kB (`ru_maxrss` is kB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def thread_cpu_s() -> dict[int, tuple[str, float]]:
    """CPU seconds of each live thread of this process, by native id, with its Python name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Fields after the ")" that closes the command name: utime, stime are 12th, 13th.
            rest = (task / "stat").read_text().rpartition(")")[2].split()
            tid = int(task.name)
            found[tid] = (names.get(tid, f"native-{tid}"), (int(rest[11]) + int(rest[12])) / ticks)
    return found


def thread_groups(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], total: float
) -> dict[str, float]:
    """CPU by thread family over an interval; threads that ended in it are the remainder.

    The task runner's worker threads end when the batch's pool closes, so what no surviving
    thread accounts for is charged to them.
    """
    groups: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        group = name.rstrip("0123456789_-() ").removesuffix(" (run")
        groups[group] = groups.get(group, 0.0) + cpu - before.get(tid, (name, 0.0))[1]
    groups["task runner workers (ended)"] = total - sum(groups.values())
    return {k: v for k, v in groups.items() if abs(v) >= 0.005}
