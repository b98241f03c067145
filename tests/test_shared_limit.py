"""Several flow runs share one Fireworks budget through Prefect global concurrency limits.

Each run is its own process, as runs of a deployment on different workers would be, so the
only thing they share is the Prefect API (the session's test server) and the emulator, which
counts how many generations are in flight at once and, given an `rpm_limit`, answers 429 past
it. The runs start together (each waits on stdin after its imports) and each asks for more
than the limits allow, so their API calls must compete.

A run holds the user's `concurrency_limit` in leased blocks of many slots and takes its
`rate_limit` (a limit with slot decay) in batches of tokens (`flux_flows/rendering/limits.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.settings import PREFECT_API_URL

from flux_flows import FinishReason
from flux_flows.emulator import state as emulator_state
from flux_flows.flows import generate_images
from flux_flows.rendering.limit_settings import lease_s
from flux_flows.rendering.limits import RENEW_FRACTION

pytestmark = pytest.mark.usefixtures("flow_env")

LIMIT = 2
PER_RUN_CONCURRENCY = 3  # more than LIMIT, so one run alone would already break the limit
IMAGES_PER_RUN = 6
LATENCY_S = 0.4
RUN_TIMEOUT_S = 120.0

# One flow run in a fresh interpreter: import first, report ready, start on a line from stdin,
# so both runs begin their API calls together whatever each interpreter's start-up time.
RUNNER = """
import json, sys
from flux_flows.flows import generate_images
args = json.loads(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
state = generate_images(
    args["prompts"],
    args["destination"],
    max_concurrency=args["max_concurrency"],
    concurrency_limit=args["concurrency_limit"],
    rate_limit=args.get("rate_limit"),
    return_state=True,
)
report = state.result()
print("result " + json.dumps({
    "completed": state.is_completed(),
    "counts": report.counts,
    "api_calls": report.api_calls,
}), flush=True)
"""


class FlowRunProcess:
    """A child interpreter running one batch; its stdout is read by a thread into a queue."""

    def __init__(self, args: dict[str, Any], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=cwd,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, deadline: float) -> str:
        """The next stdout line starting with `prefix`, or fail at the deadline (no sleeping)."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {prefix!r} line before the deadline; {self.stderr()}"
                ) from None
            if line is None:
                raise AssertionError(f"exited before printing {prefix!r}; {self.stderr()}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        self._log.flush()
        return "stderr tail:\n" + self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def child_env(tmp_path: Path) -> dict[str, str]:
    """The test's environment (emulator key and URL, spill folder) plus the session's Prefect API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    return env


@contextlib.contextmanager
def global_limit(limit: int, decay: float = 0.0) -> Iterator[str]:
    """A fresh global concurrency limit (a rate limit with `decay`), removed afterwards."""
    name = f"fireworks-test-{uuid.uuid4().hex[:8]}"
    create = GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=decay)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(create)
    try:
        yield name
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(name)


@pytest.fixture
def shared_limit() -> Iterator[str]:
    """A fresh global concurrency limit of LIMIT slots."""
    with global_limit(LIMIT) as name:
        yield name


def active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return int(client.read_global_concurrency_limit_by_name(name).active_slots)


def run_two_batches(
    tmp_path: Path,
    env: dict[str, str],
    concurrency_limit: str | None,
    *,
    images: int = IMAGES_PER_RUN,
    max_concurrency: int = PER_RUN_CONCURRENCY,
    rate_limit: str | None = None,
) -> list[dict[str, Any]]:
    """Start two batch runs in separate processes at the same moment; return their results."""
    runs = []
    try:
        for n in range(2):
            args = {
                "prompts": [f"run {n} image {i}" for i in range(images)],
                "destination": str(tmp_path / f"out-{n}"),
                "max_concurrency": max_concurrency,
                "concurrency_limit": concurrency_limit,
                "rate_limit": rate_limit,
            }
            # cwd outside the checkout: the child imports the installed flux_flows, not ./
            runs.append(FlowRunProcess(args, env, tmp_path / f"run-{n}.log", cwd=tmp_path))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for run in runs:
            run.expect("ready", deadline)
        for run in runs:
            run.go()
        results = [json.loads(run.expect("result", deadline)) for run in runs]
        for run in runs:
            assert run.proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, run.stderr()
        return results
    finally:
        for run in runs:
            run.stop()


def test_two_runs_share_a_global_limit(
    tmp_path: Path, flow_env: Any, child_env: dict[str, str], shared_limit: str
) -> None:
    flow_env.configure(latency_s=LATENCY_S)
    results = run_two_batches(tmp_path, child_env, shared_limit)
    for result in results:
        assert result["completed"]
        assert result["counts"][FinishReason.SUCCESS] == IMAGES_PER_RUN
        assert result["api_calls"] == IMAGES_PER_RUN
    assert flow_env.stats.generations == 2 * IMAGES_PER_RUN
    # Never more than the limit in flight, and the limit was actually used to the full.
    assert flow_env.stats.max_in_flight == LIMIT
    for n in range(2):
        assert len(list((tmp_path / f"out-{n}" / "images").iterdir())) == IMAGES_PER_RUN
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(shared_limit)
    assert limit.active_slots == 0, "every slot taken must be given back"


def test_without_the_limit_the_runs_overlap(
    tmp_path: Path, flow_env: Any, child_env: dict[str, str]
) -> None:
    """The control: the same two runs unlimited exceed LIMIT, and even one run's own bound.

    More in flight than PER_RUN_CONCURRENCY can only happen if both runs called the API at the
    same time, so this also proves the setup above really makes the runs compete.
    """
    # Longer answers than above: each run's API phase (~4 s) then dwarfs the difference in when
    # the two interpreters get their flow runs going on a loaded machine.
    flow_env.configure(latency_s=5 * LATENCY_S)
    results = run_two_batches(tmp_path, child_env, None)
    assert all(r["counts"][FinishReason.SUCCESS] == IMAGES_PER_RUN for r in results)
    assert flow_env.stats.max_in_flight > PER_RUN_CONCURRENCY > LIMIT


def test_a_missing_limit_never_runs_unlimited(tmp_path: Path, flow_env: Any) -> None:
    """A misspelt limit name must not quietly mean "no limit" (Prefect's own default)."""
    prompts = [f"unlimited {i}" for i in range(4)]
    state = generate_images(
        prompts, str(tmp_path), concurrency_limit="no-such-limit-here", return_state=True
    )
    if state.is_failed():  # refused before any work, naming the limit
        assert "no-such-limit-here" in (state.message or "")
    else:  # or every image failed saying why
        report = state.result()
        assert report.counts[FinishReason.SUCCESS] == 0
        assert all("no-such-limit-here" in (r.error or "") for r in report.records)
    assert flow_env.stats.requests == 0


# Two runs of 8 in flight each on a limit of 6: each holds blocks of 2 slots (a quarter of its
# window), so between them they must fill the limit without ever passing it.
BLOCK_LIMIT = 6
BLOCK_RUN_CONCURRENCY = 8
BLOCK_IMAGES = 24


def test_two_runs_share_a_limit_in_blocks(
    tmp_path: Path, flow_env: Any, child_env: dict[str, str]
) -> None:
    flow_env.configure(latency_s=LATENCY_S)
    with global_limit(BLOCK_LIMIT) as name:
        results = run_two_batches(
            tmp_path,
            child_env,
            name,
            images=BLOCK_IMAGES,
            max_concurrency=BLOCK_RUN_CONCURRENCY,
        )
        for result in results:
            assert result["counts"][FinishReason.SUCCESS] == BLOCK_IMAGES
            assert result["api_calls"] == BLOCK_IMAGES
        assert flow_env.stats.max_in_flight == BLOCK_LIMIT
        assert active_slots(name) == 0, "every block taken must be given back"


# A rate limit of RPM a minute, checked by the emulator over a window shortened to WINDOW_S so
# that a test of ~25 s sends more than one window's worth: the emulator answers 429 as soon as
# more than RPM * WINDOW_S / 60 requests arrive within any WINDOW_S. The Prefect limit allows a
# burst of BURST and DECAY a second after it: BURST + WINDOW_S * DECAY stays within the window.
RPM = 600
WINDOW_S = 20.0
BURST = 12
DECAY = 9.4
RATE_IMAGES = 110  # per run: 220 in all, more than the 200 one window allows


def test_two_runs_share_a_rate_limit(
    tmp_path: Path,
    flow_env: Any,
    child_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    in_window = int(RPM * WINDOW_S / 60)
    assert in_window >= BURST + WINDOW_S * DECAY
    monkeypatch.setattr(emulator_state, "RATE_WINDOW_S", WINDOW_S)
    flow_env.configure(latency_s=0.05, rpm_limit=in_window)
    arrivals: list[float] = []
    stats = flow_env.stats
    record_start = stats.record_start

    def timed_start() -> None:
        arrivals.append(time.monotonic())
        record_start()

    monkeypatch.setattr(stats, "record_start", timed_start)
    with global_limit(BURST, DECAY) as name:
        results = run_two_batches(
            tmp_path, child_env, None, images=RATE_IMAGES, max_concurrency=8, rate_limit=name
        )
    for result in results:
        assert result["counts"][FinishReason.SUCCESS] == RATE_IMAGES
        assert result["api_calls"] == RATE_IMAGES
    assert stats.by_status.get(429, 0) == 0, stats.as_dict()
    assert len(arrivals) == 2 * RATE_IMAGES > in_window
    # Within the limit in every window, and close to it: the pace the runs reached together.
    arrivals.sort()
    most = max(
        sum(1 for t in arrivals[i:] if t < start + WINDOW_S) for i, start in enumerate(arrivals)
    )
    assert most <= in_window
    per_s = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(f"rate limit: {most} in the busiest {WINDOW_S:.0f} s (of {in_window}), {per_s:.2f}/s")
    assert per_s >= 0.9 * RPM / 60, f"{per_s:.2f} requests/s"


# The Prefect server refuses leases under 60 s, so the lease cannot be made shorter than that
# (FLUX_FLOWS_SLOT_LEASE_S only lengthens it). The session's test server is an ephemeral one,
# which runs no repossessor (expired leases would never be freed), so this test starts a real
# `prefect server start` whose repossessor looks for expired leases every second.
KILL_LIMIT = 4
SERVER_START_S = 240.0


@pytest.fixture
def server_with_repossessor(tmp_path: Path) -> Iterator[str]:
    """The API URL of a `prefect server start` of its own, stopped afterwards."""
    import httpx

    from helpers.common import free_port

    home = tmp_path / "prefect-server"
    home.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="1",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_FOREMAN_ENABLED="false",
    )
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-ui"]
    with (home / "server.log").open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                    break
            assert server.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Prefect server did not start"
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=0.5)  # a poll interval that returns if it dies
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_a_killed_holders_slots_come_back_with_its_lease(
    tmp_path: Path,
    flow_env: Any,
    child_env: dict[str, str],
    server_with_repossessor: str,
) -> None:
    from prefect.settings import temporary_settings

    lease = lease_s()
    flow_env.configure(latency_s=20.0)  # still in flight when the holder is killed
    env = {**child_env, "PREFECT_API_URL": server_with_repossessor}
    with (
        temporary_settings(updates={PREFECT_API_URL: server_with_repossessor}),
        global_limit(KILL_LIMIT) as name,
    ):
        args = {
            "prompts": [f"killed {i}" for i in range(2 * KILL_LIMIT)],
            "destination": str(tmp_path / "out"),
            "max_concurrency": KILL_LIMIT,
            "concurrency_limit": name,
        }
        run = FlowRunProcess(args, env, tmp_path / "killed.log", cwd=tmp_path)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            run.expect("ready", deadline)
            run.go()
            assert flow_env.stats.wait_for(
                lambda s: s.in_flight == KILL_LIMIT, timeout=RUN_TIMEOUT_S
            ), run.stderr()
            assert active_slots(name) == KILL_LIMIT
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait(timeout=30)
            killed_at = time.monotonic()
        finally:
            run.stop()
        assert active_slots(name) == KILL_LIMIT, "nobody gave them back: the holder is dead"
        back_by = killed_at + lease + 10.0
        poll = threading.Event()
        while active_slots(name) and time.monotonic() < back_by:
            poll.wait(0.5)  # a poll interval, not a synchronisation: the deadline decides
        freed_after = time.monotonic() - killed_at
        print(f"killed holder: {KILL_LIMIT} slots back {freed_after:.1f} s after the kill")
        assert active_slots(name) == 0, f"slots still held {freed_after:.0f} s after the kill"
        # Not before the lease ran out: it was last renewed at most RENEW_FRACTION of it ago.
        assert freed_after >= lease * (1 - RENEW_FRACTION) - 1.0


# Dask chunks hold the limit the same way: 4 chunks at once (2 workers x 2 threads), each with
# 2 of the batch's 8 in flight, on a limit of 3: together they must fill it, never pass it.
DASK_LIMIT = 3
DASK_IMAGES = 16
# How long the emulator holds the first answers for the chunks to reach the limit together.
DASK_GATE_S = 90.0


def hold_answers_until_in_flight(
    monkeypatch: pytest.MonkeyPatch, stats: Any, count: int, timeout: float
) -> threading.Event:
    """Make the emulator hold its answers until `count` requests are in flight at once, then
    answer as configured; the returned event is set when the gate opened on that count.

    Chunks start in worker processes whose start-up differs by seconds on a loaded machine, so
    with a fixed latency the first chunks may be done before the last begin, and the peak in
    flight measures the machine's load, not the limit. Held answers keep every request's slot
    taken until the others arrive: the limit is then the only thing that stops more requests,
    so reaching `count` shows it is shared and never passing it shows it holds. Nothing is
    decided by a clock: the timeout only turns a never-reached count into a failure, not a hang.
    """
    from flux_flows.emulator import app as emulator_app

    stayed = emulator_app._client_stayed
    opened, done = threading.Event(), threading.Event()

    def reached() -> bool:
        return bool(stats.wait_for(lambda s: s.in_flight >= count, timeout=timeout))

    async def held_then_stayed(request: Any, seconds: float) -> bool:
        if not done.is_set():
            if await asyncio.to_thread(reached):
                opened.set()
            done.set()  # reached or timed out: later answers are not held
        return await stayed(request, seconds)

    monkeypatch.setattr(emulator_app, "_client_stayed", held_then_stayed)
    return opened


def test_dask_chunks_hold_the_shared_limit(
    tmp_path: Path, flow_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distributed
    from prefect_dask import DaskTaskRunner

    flow_env.configure(latency_s=LATENCY_S)
    opened = hold_answers_until_in_flight(monkeypatch, flow_env.stats, DASK_LIMIT, DASK_GATE_S)
    # The workers inherit it: the same Prefect API as the batch, where the limit is.
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    with (
        global_limit(DASK_LIMIT) as name,
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            dashboard_address=None,
            silence_logs=40,
        ) as cluster,
    ):
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        state = generate_images.with_options(task_runner=runner)(
            [f"dask shared {i}" for i in range(DASK_IMAGES)],
            str(tmp_path / "out"),
            max_concurrency=8,
            chunk_size=4,
            concurrency_limit=name,
            return_state=True,
        )
        report = state.result()
        assert report.counts[FinishReason.SUCCESS] == DASK_IMAGES
        assert report.api_calls == DASK_IMAGES
        # Filled (the chunks' slots come from one limit: 2 + 1, not 2 each) and never passed.
        assert opened.is_set(), f"never {DASK_LIMIT} in flight: {flow_env.stats.as_dict()}"
        assert flow_env.stats.max_in_flight == DASK_LIMIT
        assert active_slots(name) == 0


def test_cli_run_takes_a_rate_limit_by_name(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """`flux-flows run --rate-limit NAME` reaches the flow: a missing limit stops it unpaid."""
    command = [sys.executable, "-m", "flux_flows.cli", "run", "--prompt", "a shared fox"]
    command += ["--to", str(tmp_path / "out"), "--rate-limit", "no-such-rpm-limit"]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=240,
    )
    assert done.returncode != 0
    assert "no-such-rpm-limit" in done.stdout + done.stderr
