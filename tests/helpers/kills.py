"""Killing batches, workers and machines mid-run, and checking what a kill may cost."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flux_flows.results import BatchReport
from helpers.matrix import (
    DELIVERY_FAULT,
    GenKey,
    Row,
    Scenario,
    check_invariants,
    emulator_key,
    generated_snapshot,
    line_of,
)

pytestmark = pytest.mark.usefixtures("flow_env")

BATCH_SCRIPT = """
import json, sys
from flux_flows.flows import generate_images

prompts, destination, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
report = generate_images(prompts, destination, max_concurrency=int(sys.argv[4]))
with open(out, "w", encoding="utf-8") as handle:
    handle.write(report.model_dump_json())
"""
CACHE_KEY_IN_NAME = re.compile(r"([0-9a-f]{32})\.[a-z0-9]+$")


def cache_keys(names: set[str]) -> set[str]:
    return {m.group(1) for name in names if (m := CACHE_KEY_IN_NAME.search(name))}


CHUNKED_BATCH_SCRIPT = """
import json, sys
from prefect_dask import DaskTaskRunner
from flux_flows.flows import generate_images

if __name__ == "__main__":
    prompts, destination = json.loads(sys.argv[1]), sys.argv[2]
    runner = DaskTaskRunner(
        cluster_kwargs={
            "n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None
        }
    )
    generate_images.with_options(task_runner=runner)(
        prompts, destination, max_concurrency=int(sys.argv[3]), chunk_size=int(sys.argv[4])
    )
"""


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """The test's env (emulator, moto, spill folder) with this session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def kill_group(leader: subprocess.Popen[Any], deadline_s: float = 30.0) -> None:
    """SIGKILL the process group `leader` heads and wait until none of its processes is alive
    (a zombie whose parent died is not: it runs nothing and holds no connection)."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait(timeout=deadline_s)
    deadline = time.monotonic() + deadline_s
    while alive := [
        p.pid
        for p in psutil.process_iter(["status"])
        if pgid(p.pid) == leader.pid and p.info["status"] != psutil.STATUS_ZOMBIE
    ]:
        assert time.monotonic() < deadline, f"{alive} outlived SIGKILL of their group"
        procs = []
        for pid in alive:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        psutil.wait_procs(procs, timeout=0.5)


def wait_for_stored(
    sc: Scenario, at_least: int, alive: Callable[[], bool], log: Callable[[], str]
) -> None:
    """Until `at_least` images are in the bucket, woken by each new generation (no fixed sleep)."""
    deadline = time.monotonic() + 90
    while len(sc.dest.keys("images/")) < at_least:
        assert alive(), "the batch ended before it was killed:\n" + log()[-3000:]
        assert time.monotonic() < deadline, "no progress:\n" + log()[-3000:]
        seen = sc.emulator.stats.generations
        sc.emulator.stats.wait_for(lambda s, seen=seen: s.generations > seen, timeout=0.5)


@dataclass
class AfterKill:
    """What a kill cost, counted over the killed run and its re-run."""

    report: BatchReport  # the re-run's
    rerun: Counter[GenKey]  # the re-run's generations
    in_flight_at_kill: set[GenKey]  # generated before the kill, never stored by the killed run
    lost: int  # billed generations whose image is not stored at the end
    paid_twice: int  # extra generations beyond those of the images in flight at the kill
    billed_undelivered: int


def at_kill(sc: Scenario) -> tuple[set[str], int, int]:
    """What the killed run left: cache keys of the images in the destination, filtered answers
    in the destination, images in the spill folder."""
    from flux_flows.rendering.spill import SpillFolder

    spilled = SpillFolder(sc.destination, Path(os.environ["FLUX_FLOWS_SPILL_DIR"])).cache_keys()
    return cache_keys(sc.dest.keys("images/")), len(sc.dest.keys("filtered/")), len(spilled)


def kill_row(
    sc: Scenario,
    behaviour: str,
    *,
    requested: int,
    stored: int,
    filtered: int,
    errors: int | str,
    spilled: int,
    after: AfterKill,
    expected_rerun: int,
) -> Row:
    row = Row(
        sc.fault,
        behaviour,
        sc.test,
        requested,
        stored,
        filtered,
        errors,
        spilled,
        after.lost,
        after.paid_twice,
        after.billed_undelivered,
        f"{sum(after.rerun.values())} (expected {expected_rerun})",
        in_flight_at_kill=len(after.in_flight_at_kill),
    )
    sc.rows.append(row)
    print("MATRIX " + line_of(row))
    return row


def run_batch_process(sc: Scenario, prompts: list[str], tmp_path: Path) -> BatchReport:
    """The batch in a fresh process (plain threads, max_concurrency 4), to its end."""
    out, log = tmp_path / "rerun.json", tmp_path / "rerun.log"
    argv = [sys.executable, "-c", BATCH_SCRIPT, json.dumps(prompts), sc.destination, str(out)]
    with log.open("wb") as sink:
        done = subprocess.run(
            [*argv, "4"],
            env=subprocess_env(tmp_path),
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert done.returncode == 0, log.read_text()[-3000:]
    return BatchReport.model_validate_json(out.read_text(encoding="utf-8"))


@dataclass
class Killed:
    """What a batch process SIGKILLed mid-run left: what it had paid for, the cache keys of the
    images in the destination, the filtered answers there, the images in the spill folder, and
    how many processes died with it."""

    paid: Counter[GenKey]
    stored: set[str]
    filtered: int
    spilled: int
    processes: int


def kill_mid_batch(
    sc: Scenario, argv: list[str], tmp_path: Path, *, at_least: int, group: bool
) -> Killed:
    """Start the batch `argv` in a process (with this session's Prefect API: no server start-up)
    and SIGKILL it once `at_least` images are stored: the process alone, or with `group` the
    process group it leads (a session of its own) and every process in it."""
    import psutil

    log = tmp_path / "killed.log"
    processes = 1
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv,
            env=subprocess_env(tmp_path),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=group,
        )
        try:
            wait_for_stored(
                sc,
                at_least,
                lambda: process.poll() is None,
                lambda: log.read_text(errors="replace"),
            )
            if group:
                processes = len([p for p in psutil.process_iter() if pgid(p.pid) == process.pid])
        finally:
            if group:
                kill_group(process)
            else:
                process.kill()
                process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    paid, _ = generated_snapshot(sc.emulator)
    return Killed(paid - sc.start, *at_kill(sc), processes=processes)


def rerun_after_kill(
    sc: Scenario,
    prompts: list[str],
    tmp_path: Path,
    *,
    paid_before_kill: Counter[GenKey],
    stored_at_kill: set[str],
    in_flight_bound: int,
) -> AfterKill:
    """Re-run the batch in a fresh process (plain threads) and check what a kill may cost:
    every image stored exactly once, the re-run generated exactly the images not stored at the
    kill, each once, and the only images paid twice are those generated but not stored at the
    kill (at most `in_flight_bound`)."""
    n = len(prompts)
    report = run_batch_process(sc, prompts, tmp_path)
    total, _ = generated_snapshot(sc.emulator)
    total -= sc.start
    rerun = total - paid_before_kill

    key_of = {r.cache_key: emulator_key(r) for r in report.records}
    stored_keys = {key_of[ck] for ck in stored_at_kill}
    in_flight_at_kill = set(paid_before_kill) - stored_keys
    # Every image exactly once in the bucket: one object per distinct request, none extra.
    assert sorted(cache_keys(sc.dest.keys("images/"))) == sorted(key_of)
    assert len(sc.dest.keys("images/")) == n
    # The re-run generated exactly the images not yet stored, each once.
    assert sum(rerun.values()) == n - len(stored_at_kill)
    assert set(rerun) == set(key_of.values()) - stored_keys
    assert set(rerun.values()) <= {1}  # none at all if everything was stored before
    # The only double payment: images generated when the process died, never stored.
    paid_twice = {key for key, count in total.items() if count > 1}
    assert paid_twice == in_flight_at_kill
    assert len(in_flight_at_kill) <= in_flight_bound
    assert max(total.values()) <= 2
    outcomes, _, _ = check_invariants(report, sc.dest, rerun)
    assert set(outcomes.values()) == {"stored"}
    assert report.cache_hits == len(stored_at_kill) and report.api_calls == n - len(stored_at_kill)
    stored_at_end = {key_of[ck] for ck in cache_keys(sc.dest.keys("images/"))}
    after = AfterKill(
        report=report,
        rerun=rerun,
        in_flight_at_kill=in_flight_at_kill,
        lost=sum(count for key, count in total.items() if key not in stored_at_end),
        paid_twice=sum(count - 1 for key, count in total.items() if key not in in_flight_at_kill),
        billed_undelivered=sum(
            count for key, count in total.items() if DELIVERY_FAULT.search(key[1])
        ),
    )
    assert after.lost == 0 and after.paid_twice == 0
    return after


def pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return -1


PROJECT_ROOT = Path(__file__).resolve().parents[2]
PREFECT_BIN = str(Path(sys.executable).with_name("prefect"))
POOL = "flux-flows-pool"  # as deployments/prefect.yaml declares the chunk deployment's pool
CHUNK_DEPLOYMENT = "render-chunk/flux-flows-chunks"
# The chunk runs' heartbeats (`<chunk>.alive`), every 2 s here instead of 20 s: the batch takes a
# RUNNING chunk run whose heartbeat stopped for MISSED_BEATS beats for dead and marks it Crashed.
# No Prefect zombie automation, no Prefect heartbeat setting: an OSS server has neither by default.
CHUNK_BEAT_S = 2.0


def prefect_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [PREFECT_BIN, *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def worker_env(tmp_path: Path) -> dict[str, str]:
    """What a worker host provides (as in test_deployment): this session's Prefect API, the
    emulator's URL and key, moto's AWS settings, a spill folder; Prefect's defaults otherwise
    (no flow-run heartbeats)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=str(tmp_path / "worker-prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_CLI_COLORS="false",
    )
    return env


def process_tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def kill_tree(pid: int, *, whole_tree: bool = True) -> None:
    """SIGKILL every process group in the tree under `pid` (the worker's, and its flow-run
    process's, which Prefect 3 starts in a session of its own): the machine dies. With
    `whole_tree=False`, only the group `pid` leads."""
    groups = {pgid(p.pid) for p in process_tree(pid)} if whole_tree else {pgid(pid)}
    groups -= {-1, os.getpgid(0)}
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def rerun_and_record(
    sc: Scenario,
    prompts: list[str],
    tmp_path: Path,
    left: Killed,
    *,
    in_flight_bound: int,
    describe: Callable[[AfterKill], str],
) -> AfterKill:
    """`rerun_after_kill` after `kill_mid_batch`, then the scenario's row (`describe` words it)."""
    after = rerun_after_kill(
        sc,
        prompts,
        tmp_path,
        paid_before_kill=left.paid,
        stored_at_kill=left.stored,
        in_flight_bound=in_flight_bound,
    )
    kill_row(
        sc,
        describe(after),
        requested=len(prompts),
        stored=len(left.stored),
        filtered=left.filtered,
        errors="-",
        spilled=left.spilled,
        after=after,
        expected_rerun=len(prompts) - len(left.stored),
    )
    return after
