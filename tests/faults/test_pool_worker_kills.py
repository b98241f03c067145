"""The fault matrix, work pools: a pool worker SIGKILLed mid-chunk, and how the batch tells a
chunk run that died from one that is slow (its heartbeat)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

from flux_flows.flows import generate_images
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.rendering.work_pools import MISSED_BEATS
from flux_flows.results import BatchReport, ImageRecord
from helpers.common import wait_for_online_workers
from helpers.kills import (
    CHUNK_BEAT_S,
    CHUNK_DEPLOYMENT,
    POOL,
    PREFECT_BIN,
    PROJECT_ROOT,
    cache_keys,
    kill_row,
    kill_tree,
    prefect_cli,
    process_tree,
    rerun_after_kill,
    worker_env,
)
from helpers.matrix import Scenario, check_invariants, distinct, emulator_key, generated_snapshot

pytestmark = pytest.mark.usefixtures("flow_env")


class PoolWorkers:
    """Two process workers of POOL, one chunk at a time each, and a watcher that SIGKILLs the
    first one caught with a chunk's requests in flight at the emulator (`machine`: with its
    flow-run process, which Prefect starts in a session of its own; `worker-group`: the
    worker's own process group only), then makes sure the batch cannot hang after that."""

    def __init__(self, sc: Scenario, env: dict[str, str], tmp_path: Path, scope: str) -> None:
        self.sc, self.env, self.scope = sc, env, scope
        self.logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
        self.names = [f"fault-worker-{scope}-{i}-{os.getpid()}" for i in range(2)]
        self.workers: list[subprocess.Popen[bytes]] = []
        self.killed: dict[str, Any] = {}
        self.stop = threading.Event()
        self.emulator_port = urlsplit(sc.emulator.base_url).port
        self.watcher = threading.Thread(target=self._watch, daemon=True)

    def tails(self) -> str:
        return "\n".join(log.read_text(errors="replace")[-3000:] for log in self.logs)

    def __enter__(self) -> PoolWorkers:
        command = [PREFECT_BIN, "worker", "start", "--pool", POOL, "--type", "process"]
        command += ["--limit", "1"]  # one chunk at a time: what one kill can cost is bounded
        try:
            for name, log in zip(self.names, self.logs, strict=True):
                with log.open("wb") as sink:
                    self.workers.append(
                        subprocess.Popen(
                            [*command, "--name", name],
                            env=self.env,
                            cwd=PROJECT_ROOT,
                            stdout=sink,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            with get_client(sync_client=True) as client:
                wait_for_online_workers(client, POOL, self.names, self.workers, self.tails)
        except BaseException:
            self.__exit__()
            raise
        self.watcher.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        if self.watcher.is_alive():
            self.watcher.join(timeout=30)
        for worker in self.workers:
            if worker.poll() is None:
                kill_tree(worker.pid)
            worker.wait(timeout=30)

    def _chunk_is_stored(self, run_id: str) -> bool:
        """Whether every image of the run's chunk is already in the bucket (then its results
        may be written any moment: too late to catch it mid-chunk)."""
        with get_client(sync_client=True) as client:
            chunk_key = client.read_flow_run(run_id).parameters["chunk_key"]
        body = self.sc.dest.read(f"{self.sc.destination}/{chunk_key}") or b""
        wanted = {ImageRequest.model_validate_json(line).cache_key for line in body.splitlines()}
        return bool(wanted) and wanted <= cache_keys(self.sc.dest.keys("images/"))

    def _caught_mid_chunk(self, proc: Any) -> str | None:
        """The flow-run id of `proc` if its chunk's requests are in flight right now."""
        with contextlib.suppress(psutil.Error):
            busy = [
                c
                for c in proc.net_connections(kind="tcp")
                if c.raddr and c.raddr.port == self.emulator_port
            ]
            run_id = proc.environ().get("PREFECT__FLOW_RUN_ID")
            if busy and run_id and self.sc.emulator.stats.in_flight > 0:
                return None if self._chunk_is_stored(run_id) else run_id
        return None

    def _kill(self, worker: subprocess.Popen[bytes], proc: Any, run_id: str) -> None:
        kill_tree(worker.pid, whole_tree=self.scope == "machine")
        worker.wait(timeout=30)
        if self.scope == "machine":  # SIGKILL is delivered, then acted on
            lived = bool(psutil.wait_procs([proc], timeout=10)[1])
        else:  # right after its worker died: its images are in flight
            try:
                lived = proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                lived = False
        self.killed.update(worker=worker, run_id=run_id, chunk_process_lived=lived)

    def _watch(self) -> None:
        while not self.stop.is_set() and not self.killed:
            for worker in self.workers:
                for proc in process_tree(worker.pid)[1:]:
                    if run_id := self._caught_mid_chunk(proc):
                        self._kill(worker, proc, run_id)
                        break
                if self.killed:
                    break
            self.stop.wait(0.05)
        # The batch waits for the orphaned run to reach a final state; if it never marks it, end
        # it here so the test fails instead of hanging 6 hours.
        if self.killed and not self.stop.wait(MISSED_BEATS * CHUNK_BEAT_S + 60):
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(self.killed["run_id"]).state
                if state is None or not state.is_final():
                    self.killed["forced"] = state.name if state else "no state"
                    client.set_flow_run_state(self.killed["run_id"], Crashed(), force=True)

    def checked_kill(self) -> dict[str, Any]:
        """What the watcher killed, once it is known that the batch, not the test, ended it."""
        assert self.killed, "no worker was caught mid-chunk:\n" + self.tails()
        assert "forced" not in self.killed, (
            f"the killed worker's run stayed {self.killed['forced']} until the test's deadline: "
            f"nothing marked it final\n{self.tails()}"
        )
        assert self.killed["worker"].returncode == -signal.SIGKILL
        return self.killed


def deploy_the_chunk_flow(env: dict[str, str]) -> None:
    prefect_cli(env, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    prefect_cli(
        env, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name",
        CHUNK_DEPLOYMENT.partition("/")[2],
    )  # fmt: skip


def chunk_run_states(s3_bucket: str) -> dict[str, Any]:
    """The states of this batch's chunk runs (the session's API keeps other tests' runs: those
    whose destination is in this test's bucket), after checking that the batch left no
    concurrency limit of its own behind."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[CHUNK_DEPLOYMENT.partition("/")[2]])
            )
        )
        limits = [x.name for x in client.read_global_concurrency_limits(limit=100)]
    assert not [name for name in limits if name.startswith("flux-flows-")]
    bucket = f"s3://{s3_bucket}/"
    return {str(r.id): r.state for r in runs if r.parameters["destination"].startswith(bucket)}


def check_the_killed_chunk(
    scope: str, killed: dict[str, Any], state: Any, errors: list[Any], chunk_size: int
) -> None:
    if scope == "machine":
        # The batch marked the orphaned run Crashed when its heartbeat stopped; its chunk's
        # images are ERROR records of this run; all the others are stored.
        assert not killed["chunk_process_lived"]
        assert state.type is StateType.CRASHED, state
        assert "stopped answering" in (state.message or ""), state.message
        assert len(errors) == chunk_size
        assert all("Crashed without results" in (r.error or "") for r in errors)
    else:
        # The flow-run process outlived its worker (its own session) and ran on; its run ends
        # in a final state, its heartbeat beating; its chunk is stored or ERROR whole.
        assert killed["chunk_process_lived"], "the flow-run process died with its worker's group"
        assert state.is_final(), state
        assert len(errors) in (0, chunk_size)


def behaviour_of(
    scope: str, state: Any, errors: int, batch_s: float, chunk_size: int, stored_by_killed: int
) -> str:
    if scope == "machine":
        return (
            f"the batch marks the orphaned chunk run Crashed when its heartbeat stops "
            f"({CHUNK_BEAT_S:.0f} s beats, dead after {MISSED_BEATS}) and ends in "
            f"{batch_s:.0f} s with its {chunk_size} images ERROR ({stored_by_killed} of them "
            "stored before the kill); the re-run generates only the rest"
        )
    return (
        f"the chunk's flow-run process runs on without its worker; its run ends "
        f"{state.name} ({state.message!r}), the batch in {batch_s:.0f} s with "
        f"{errors} images ERROR; the re-run generates only the rest"
    )


@dataclass
class Ended:
    errors: list[ImageRecord]
    killed_state: Any  # the killed chunk run's final state
    kinds: Counter[str]  # outcomes per requested image
    stored_at_end: set[str]  # cache keys of the images in the destination


def check_the_batch(
    sc: Scenario,
    report: BatchReport,
    first: Counter[Any],
    s3_bucket: str,
    scope: str,
    killed: dict[str, Any],
    chunk_size: int,
    concurrency: int,
) -> Ended:
    """What the killed batch ended with: its chunk runs, its records, the invariants, and
    nothing generated lost but what the killed process had in flight (paid, never stored)."""
    n = len(report.records)
    states = chunk_run_states(s3_bucket)
    assert len(states) == -(-n // chunk_size), states
    killed_state = states.pop(killed["run_id"])
    assert all(s.type is StateType.COMPLETED for s in states.values()), states
    errors = [r for r in report.records if r.finish_reason is FinishReason.ERROR]
    check_the_killed_chunk(scope, killed, killed_state, errors, chunk_size)
    assert report.counts[FinishReason.SUCCESS.value] == n - len(errors)
    outcomes, _, _ = check_invariants(report, sc.dest, first)
    assert sc.emulator.stats.max_in_flight <= concurrency
    key_of = {r.cache_key: emulator_key(r) for r in report.records}
    stored_at_end = cache_keys(sc.dest.keys("images/"))
    unstored = set(first) - {key_of[ck] for ck in stored_at_end}
    assert unstored <= {emulator_key(r) for r in errors} and len(unstored) <= chunk_size
    kinds = Counter(outcomes[r.cache_key] for r in report.records)
    return Ended(errors, killed_state, kinds, stored_at_end)


@pytest.mark.parametrize("scope", ["machine", "worker-group"])
def test_sigkill_of_a_pool_worker_mid_chunk_then_rerun(
    scenario: Callable[..., Scenario],
    s3_bucket: str,
    tmp_path: Path,
    scope: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's chunks run as flow runs of the chunk deployment on a process pool with two
    workers (each one chunk at a time); one worker is SIGKILLed while its chunk's requests are
    in flight.

    `machine`: the worker's process group and its flow-run process's (Prefect starts that in a
    session of its own) die together. The batch still ends: the orphaned run's heartbeat stops,
    the batch marks it Crashed after MISSED_BEATS beats, its images are ERROR records, every
    other chunk is stored. `worker-group`: only the worker's own process group is killed; its
    flow-run process survives it. Either way a re-run in a new process generates only what is
    missing, and nothing is paid twice but what the killed process had in flight."""
    n, chunk_size, concurrency = 15, 3, 8  # each chunk run holds 4 of the batch's 8 slots
    monkeypatch.setenv("FLUX_FLOWS_CHUNK_HEARTBEAT_S", str(CHUNK_BEAT_S))  # read by the batch
    sc = scenario(
        (
            "pool worker and its flow-run process SIGKILLed mid-chunk"
            if scope == "machine"
            else "pool worker's process group SIGKILLed mid-chunk (its flow-run process lives)"
        )
        + f" ({n} images, chunks of {chunk_size} on 2 process workers)",
        f"s3://{s3_bucket}/pool-killed",
    )
    prompts = distinct("killed pool worker", n)
    # Long enough that a chunk's requests are caught in flight; short enough for a quick test.
    sc.emulator.configure(latency_s=1.5)
    env = worker_env(tmp_path)
    deploy_the_chunk_flow(env)
    with PoolWorkers(sc, env, tmp_path, scope) as pool:
        before, _ = generated_snapshot(sc.emulator)
        started = time.monotonic()
        state = generate_images(
            prompts,
            sc.destination,
            chunk_size=chunk_size,
            max_concurrency=concurrency,
            chunk_deployment=CHUNK_DEPLOYMENT,
            return_state=True,
        )
        batch_s = time.monotonic() - started
    killed = pool.checked_kill()
    report: BatchReport = state.result()
    paid_before_rerun, _ = generated_snapshot(sc.emulator)
    paid_before_rerun -= sc.start
    first = paid_before_rerun - (before - sc.start)
    end = check_the_batch(sc, report, first, s3_bucket, scope, killed, chunk_size, concurrency)
    errors, kinds, stored_at_end = end.errors, end.kinds, end.stored_at_end
    error_keys = {emulator_key(r) for r in errors}
    after = rerun_after_kill(
        sc,
        prompts,
        tmp_path,
        paid_before_kill=paid_before_rerun,
        stored_at_kill=stored_at_end,
        in_flight_bound=chunk_size,
    )
    assert set(after.rerun) <= error_keys  # the re-run did only the killed chunk's missing images
    assert after.report.counts[FinishReason.SUCCESS.value] == n
    stored_by_killed = len({r.cache_key for r in errors} & stored_at_end)
    kill_row(
        sc,
        behaviour_of(scope, end.killed_state, len(errors), batch_s, chunk_size, stored_by_killed),
        requested=len(report.records),
        stored=kinds["stored"],
        filtered=kinds["filtered"],
        errors=kinds["error"],
        spilled=kinds["spilled"],
        after=after,
        expected_rerun=n - len(stored_at_end),
    )


def _running_flow_run() -> Any:
    """A flow run set RUNNING on the session's API, as a chunk run is while it renders."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="heartbeat-probe")
    def probe() -> None:  # never run: only its flow run's state is used
        return None

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(probe)
        client.set_flow_run_state(run.id, Running(), force=True)
    return run.id


def test_a_chunk_run_whose_heartbeat_stops_is_crashed_by_the_batch(tmp_path: Path) -> None:
    """`pools._wait_for` on a RUNNING run whose heartbeat never changes: Crashed, with a message,
    after MISSED_BEATS beats (here 4 x 0.25 s), not after WAIT_FOR_CHUNK_S."""
    from flux_flows.rendering.work_pools import MISSED_BEATS, _wait_for
    from flux_flows.storage import open_storage

    storage = open_storage(str(tmp_path / "dest"))
    # written once, then silence
    storage.put("runs/x/chunks/chunk-00001.alive", b'{"beat": 1}', content_type="application/json")
    run_id = _running_flow_run()
    beat = 0.25
    started = time.monotonic()
    state = _wait_for(run_id, storage, "runs/x/chunks/chunk-00001.alive", beat)
    waited = time.monotonic() - started
    assert state.is_crashed(), state
    assert "stopped answering" in (state.message or "")
    assert MISSED_BEATS * beat <= waited < 60, waited


def test_a_chunk_run_that_beats_is_waited_for(tmp_path: Path) -> None:
    """A run whose heartbeat keeps changing is alive however long it takes: `_wait_for` returns
    its own final state (here Completed, set once it has outlived many dead-after deadlines)."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    from flux_flows.rendering.work_pools import MISSED_BEATS, _heartbeat, _wait_for
    from flux_flows.storage import open_storage

    storage = open_storage(str(tmp_path / "dest"))
    key = "runs/x/chunks/chunk-00001.alive"
    run_id = _running_flow_run()
    beat = 0.25
    outlived = threading.Event()

    def finish_later() -> None:
        outlived.wait(3 * MISSED_BEATS * beat)  # a duration to outlive, not a synchronisation
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Completed(), force=True)

    finisher = threading.Thread(target=finish_later, daemon=True)
    with _heartbeat(storage, key, beat):
        finisher.start()
        state = _wait_for(run_id, storage, key, beat)
    finisher.join(timeout=30)
    assert state.is_completed(), state
    assert not storage.exists(key)  # the heartbeat is removed at the end
