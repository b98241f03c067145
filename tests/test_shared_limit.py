"""Several flow runs share one Fireworks budget through a Prefect global concurrency limit.

Each run is its own process, as runs of a deployment on different workers would be, so the
only thing they share is the Prefect API (the session's test server) and the emulator, which
counts how many generations are in flight at once. The runs start together (each waits on
stdin after its imports) and each asks for more concurrency than the limit allows, under an
emulator latency long enough that their API calls must overlap.
"""

from __future__ import annotations

import json
import os
import queue
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
from flux_flows.flows import generate_images

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


@pytest.fixture
def shared_limit() -> Iterator[str]:
    """A fresh global concurrency limit of LIMIT slots, removed afterwards."""
    name = f"fireworks-test-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=LIMIT))
    yield name
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)


def run_two_batches(
    tmp_path: Path, env: dict[str, str], concurrency_limit: str | None
) -> list[dict[str, Any]]:
    """Start two batch runs in separate processes at the same moment; return their results."""
    runs = []
    try:
        for n in range(2):
            args = {
                "prompts": [f"run {n} image {i}" for i in range(IMAGES_PER_RUN)],
                "destination": str(tmp_path / f"out-{n}"),
                "max_concurrency": PER_RUN_CONCURRENCY,
                "concurrency_limit": concurrency_limit,
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
