"""Constants and helpers most test files need: the test key, free ports, the CLI as a
subprocess, a summary table's rows, workers coming online."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEST_API_KEY = "fw-test-key-do-not-leak-0123456789"
# A fresh Prefect database takes ~30 s to migrate on 2 busy cores: no start-up may rely on
# Prefect's 20 s default (issue 13).
PREFECT_START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`flux-flows ARGS` in a fresh interpreter, as a user runs it (Prefect server start-up
    included in the time it may take)."""
    return subprocess.run(
        [sys.executable, "-m", "flux_flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=PREFECT_START_TIMEOUT_S + 120,
    )


def summary_row(table: str, name: str) -> str:
    """The value of row `name` in a summary table the CLI printed (rich or plain borders)."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│|┃ ").replace("┃", "│").split("│")]
        if cells and cells[0].startswith(name):
            return cells[-1]
    raise AssertionError(f"no row {name!r} in:\n{table}")


def wait_for_online_workers(
    client: Any,
    pool: str,
    names: list[str],
    workers: list[subprocess.Popen[Any]],
    describe: Callable[[], str] = lambda: "",
    timeout_s: float = 60.0,
) -> None:
    """Until every named worker of `pool` is ONLINE at the API (a batch sizes its chunks' shares
    from them); fails at once if one of the worker processes exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        online = [
            w.name
            for w in client.read_workers_for_work_pool(pool)
            if w.status and w.status.value == "ONLINE" and w.name in names
        ]
        if len(online) == len(names):
            return
        assert all(w.poll() is None for w in workers), f"a worker exited\n{describe()}"
        assert time.monotonic() < deadline, f"workers not online: {online}\n{describe()}"
        with contextlib.suppress(subprocess.TimeoutExpired):
            workers[0].wait(timeout=0.2)  # a poll interval that returns if it dies
