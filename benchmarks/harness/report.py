"""What a benchmark prints about itself: header facts, medians and ranges, RESULT lines.

Every figure in the docs comes from a RESULT line pasted whole from a kept raw output:
`benchmarks/raw/<date>-<script>[-<what>].txt`, the command on its first line (`raw_output_path`
names it). Medians and ranges over `--repeat` rounds are computed here, never by hand.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.procs import REPO

RAW_DIR = REPO / "benchmarks" / "raw"


def raw_output_path(script: str, what: str = "", day: dt.date | None = None) -> Path:
    """Where a run's whole output is kept: `benchmarks/raw/<date>-<script>[-<what>].txt`."""
    name = Path(script).stem + (f"-{what}" if what else "")
    return RAW_DIR / f"{(day or dt.datetime.now(dt.UTC).date()).isoformat()}-{name}.txt"


def git_state() -> str:
    """The commit measured, and whether flux_flows/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "flux_flows"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" + uncommitted changes in flux_flows/" if dirty else "")


def stamp() -> str:
    """`<UTC time>; flux-flows <commit>[ + uncommitted changes in flux_flows/]`: a raw file's
    first facts, so every kept output says what it measured and when."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; flux-flows {git_state()}"


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


def uptime_text() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return load_text()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


def fmt(value: float | None, digits: int = 2) -> str:
    """A figure for a table: `n/a` for a missing or NaN one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_result(value: Any) -> str:
    """A RESULT value: words as they are, counts as integers, the rest with 2 decimals."""
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) else fmt(float(value), 2)


def result_line(figures: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={fmt_result(v)}" for k, v in figures.items())


def print_result(figures: Mapping[str, Any], prefix: str = "RESULT") -> None:
    """The machine-readable line (the last line of a run unless the script says otherwise)."""
    print(f"{prefix} {result_line(figures)}".rstrip(), flush=True)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max of the values that are numbers (NaN where none is)."""
    kept = sorted(v for v in values if v is not None and not math.isnan(float(v)))
    if not kept:
        return math.nan, math.nan, math.nan
    median = statistics.median(kept)
    if all(isinstance(v, int) for v in kept) and float(median).is_integer():
        median = int(median)  # counts stay counts (n, failed)
    return median, kept[0], kept[-1]


def print_repeat_result(rounds: Sequence[Mapping[str, Any]], prefix: str = "") -> None:
    """`RANGE repeat=K key=min-max ..` then `RESULT repeat=K key=median ..` over the rounds."""
    keys = list(rounds[0])
    spreads = {k: spread([fig.get(k, math.nan) for fig in rounds]) for k in keys}
    head = f"repeat={len(rounds)}"
    ranges = " ".join(
        f"{k}={fmt_result(lo)}-{fmt_result(hi)}" for k, (_, lo, hi) in spreads.items()
    )
    print(f"RANGE {head} {ranges}")
    print(f"RESULT {head} " + " ".join(f"{k}={fmt_result(m)}" for k, (m, _, _) in spreads.items()))


def print_figure_spreads(rounds: Sequence[Mapping[str, Any]]) -> None:
    """Each figure's median, min, max and per-round values, one line a figure."""
    print(f"  {'figure':28} {'median':>9} {'min':>9} {'max':>9}   per round")
    for key in rounds[0]:
        values = [fig.get(key, math.nan) for fig in rounds]
        med, lo, hi = spread(values)
        each = " ".join(fmt_result(v) for v in values)
        print(f"  {key:28} {fmt_result(med):>9} {fmt_result(lo):>9} {fmt_result(hi):>9}   {each}")
