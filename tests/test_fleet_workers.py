"""Runs on a fleet: a worker dying mid-chunk, hostile or unwritable `claims/`, Ctrl-C while waiting.

Each test checks the claims protocol (flux_flows/planning/claims.py) from outside, as a user meets it:
a Dask worker process SIGKILLed in the middle of its chunk, files in `claims/` written by hand
or by something hostile, a second run interrupted while it waits for images the first is
generating, and a destination whose `claims/` cannot be written. Each prints one `FLEET` line
of figures (generations at the emulator, distinct images, wall time, RSS) for RELIABILITY.md.
A folder named like a lease is stepped past with a warning, never a hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_flows import FinishReason
from flux_flows.flows import generate_images

CLI = [sys.executable, "-m", "flux_flows.cli"]


def _images(folder: Path) -> list[Path]:
    images = folder / "images"
    return (
        sorted(p for p in images.iterdir() if not p.name.startswith(".")) if images.is_dir() else []
    )


def _claims(folder: Path) -> list[str]:
    claims = folder / "claims"
    return sorted(p.name for p in claims.iterdir()) if claims.is_dir() else []


def _leases_of(folder: Path, pid: int) -> list[str]:
    """The leases in `folder`'s claims/ held by process `pid` (by its holder file's token)."""
    tokens = set()
    for holder in (folder / "claims").glob("holder-*.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(holder.read_text()).get("pid") == pid:
                tokens.add(holder.name[len("holder-") : -len(".json")])
    leases = []
    for lease in (folder / "claims").glob("*.lease"):
        with contextlib.suppress(OSError):
            if lease.read_text().strip() in tokens:
                leases.append(lease.name)
    return leases


def _manifest(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------------------------
# 1. A Dask worker process SIGKILLed mid-chunk: the chunk runs again and pays only for the rest
# --------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread_dask_cluster(flow_env: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Two worker processes (nanny-managed, so a killed one is restarted), one thread each: the
    batch cuts itself into one chunk per worker. Started after the env points at the emulator;
    the claim lease is the default (120 s), so a wait for a whole lease would show."""
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("prefect_dask")
    monkeypatch.delenv("FLUX_FLOWS_CLAIM_LEASE_S", raising=False)
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=50,
    ) as cluster:
        yield cluster


@pytest.mark.dask
def test_a_dask_worker_killed_mid_chunk_does_not_repay_its_chunk(
    tmp_path: Path, flow_env: Any, one_thread_dask_cluster: Any
) -> None:
    import distributed
    from prefect_dask import DaskTaskRunner

    n, concurrency = 20, 4
    share = concurrency // 2  # each of the 2 chunks gets half the window
    prompts = [f"a fleet heron killed mid chunk {i:02d}" for i in range(n)]
    out = tmp_path / "out"
    flow_env.configure(latency_s=0.6)  # a chunk of 10 takes ~3 s at 2 in flight
    killed: dict[str, Any] = {}
    failure: list[BaseException] = []

    with distributed.Client(one_thread_dask_cluster) as client:
        pids = client.run(os.getpid)
        assert len(pids) == 2 and os.getpid() not in pids.values()

        def kill_a_rendering_worker() -> None:
            try:
                deadline = time.monotonic() + 120
                while len(_images(out)) < n // 2:
                    assert time.monotonic() < deadline, "no progress before the kill"
                    seen = flow_env.stats.generations
                    flow_env.stats.wait_for(lambda s, seen=seen: s.generations > seen, 0.5)
                busy = [addr for addr, keys in client.processing().items() if keys]
                assert busy, "no worker is rendering a chunk"
                victim = busy[0]
                pid = client.run(os.getpid, workers=[victim])[victim]
                # Kill it while it holds a lease, so the retry must take one over from a
                # holder whose process is gone.
                deadline = time.monotonic() + 30
                while not (leases := _leases_of(out, pid)):
                    assert time.monotonic() < deadline, f"worker {pid} holds no lease"
                    flow_env.stats.wait_for(lambda s: False, 0.02)  # a poll interval
                os.kill(pid, signal.SIGKILL)
                killed.update(
                    pid=pid,
                    at=time.perf_counter(),
                    leases=len(leases),
                    stored=len(_images(out)),
                    generations=flow_env.stats.generations,
                )
            except BaseException as exc:  # re-raised by the test thread
                failure.append(exc)

        watcher = threading.Thread(target=kill_a_rendering_worker, daemon=True)
        started = time.perf_counter()
        watcher.start()
        runner = DaskTaskRunner(address=one_thread_dask_cluster.scheduler_address)
        state = generate_images.with_options(task_runner=runner)(
            prompts, str(out), max_concurrency=concurrency, chunk_size=20, return_state=True
        )
        ended = time.perf_counter()
        wall = ended - started
        watcher.join(timeout=30)
        pids_after = client.run(os.getpid)
    if failure:
        raise failure[0]

    assert killed, "the worker was never killed"
    assert state.is_completed(), state.message
    report = state.result()
    stats = flow_env.stats
    already = sum(1 for r in report.records if r.cached)
    lines = _manifest(out / "manifest.jsonl")
    print(
        f"\nFLEET dask-worker-sigkill: killed pid {killed['pid']} at {killed['stored']} stored / "
        f"{killed['generations']} generated; generations {stats.generations}, distinct "
        f"{len(stats.generated)}, paid twice {stats.duplicates}; report api_calls "
        f"{report.api_calls} + found already stored {already} = {report.api_calls + already}; "
        f"wall {wall:.1f} s, kill to end {ended - killed['at']:.1f} s (lease 120 s); leases "
        f"of the dead holder at the kill {killed['leases']}; workers after "
        f"{sorted(pids_after.values())}; claims left {_claims(out)}"
    )
    # Every image stored, once, and recorded SUCCESS.
    assert len(_images(out)) == n
    assert report.counts[FinishReason.SUCCESS] == n
    assert len(lines) == n and all(x["finish_reason"] == "SUCCESS" for x in lines)
    assert len(stats.generated) == n
    # The retried chunk paid only for what its first attempt had not stored: at most the
    # killed worker's window was paid twice, never its whole chunk (~10 more).
    assert stats.generations <= n + share, stats.as_dict()
    assert stats.duplicates <= share
    # What the report says was paid plus what it found stored is the batch, exactly; the first
    # attempt's stored images came back as found (already stored), not paid again.
    assert report.api_calls + already == n
    assert already >= 1
    assert report.api_calls == stats.generations - already - stats.duplicates
    # The dead worker's leases were taken over at once (its PID is gone on this machine), not
    # after the 120 s lease.
    assert killed["leases"] >= 1
    assert ended - killed["at"] < 60
    assert not [c for c in _claims(out) if c.endswith(".lease")]


# --------------------------------------------------------------------------------------------
# CLI runs: helpers
# --------------------------------------------------------------------------------------------

# Runs a command and writes the peak RSS of its process tree (KiB, the largest one waited for)
# to argv[1]: the figure of that command alone, not of whatever else this pytest process ran.
_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


def _run_measured(
    args: list[str], env: dict[str, str], tmp_path: Path, timeout: float = 300
) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """`flux-flows <args>`: the finished process, its wall time (s) and peak RSS (MB)."""
    rss_file = tmp_path / f"rss-{secrets.token_hex(4)}.txt"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(rss_file), *CLI, *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    wall = time.perf_counter() - started
    return done, wall, int(rss_file.read_text()) / 1024


def _cache_keys(prompts: list[str]) -> list[str]:
    """The cache keys `flux-flows run -p ...` gives these prompts: the library's own plan, with
    the CLI's default settings (the seed derived from each prompt)."""
    from flux_flows.planning.plan import plan_images
    from flux_flows.planning.sources import normalize_prompts
    from flux_flows.settings import BatchSettings

    return [p.cache_key for p in plan_images(normalize_prompts(prompts), BatchSettings())]


def _prompt_args(prompts: list[str]) -> list[str]:
    return [arg for p in prompts for arg in ("-p", p)]


# --------------------------------------------------------------------------------------------
# 2. Hostile files in claims/: logged by name and ignored, never a crash, never read whole
# --------------------------------------------------------------------------------------------


def test_hostile_claims_files_never_crash_a_run(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    prompts = [f"a fleet ibis among hostile claims {i}" for i in range(6)]
    keys = _cache_keys(prompts)
    out = tmp_path / "out"
    claims = out / "claims"
    claims.mkdir(parents=True)
    wrong_types, huge = secrets.token_hex(16), secrets.token_hex(16)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    # Valid JSON, but the pid is a string: a holder nobody can judge.
    (claims / f"holder-{wrong_types}.json").write_text(
        json.dumps(
            {
                "token": wrong_types,
                "run_id": "hostile",
                "host": "elsewhere",
                "boot_id": boot_id,
                "pid_ns": os.readlink("/proc/self/ns/pid"),
                "pid": "1",
                "start_ticks": None,
            }
        )
    )
    (claims / f"{keys[0]}.0.lease").write_text(wrong_types)
    (claims / f"{keys[1]}.0.lease").write_bytes(b"garbage \x00\xff, not a token\n" * 3)
    # 1.5 GB named like a holder, sparse: reading it whole would show in the peak RSS.
    with (claims / f"holder-{huge}.json").open("wb") as handle:
        handle.truncate(1_500_000_000)
    (claims / f"{keys[2]}.0.lease").write_text(huge)
    hostile = {
        f"holder-{wrong_types}.json": "wrong types",
        f"{keys[1]}.0.lease": "garbage lease",
        f"holder-{huge}.json": "1.5 GB holder",
    }

    done, wall, rss_mb = _run_measured(
        ["run", "--to", str(out), "-c", "4", *_prompt_args(prompts)], cli_env, tmp_path
    )
    stderr = done.stderr
    flat = "".join(stderr.split())  # rich may wrap a long path over lines
    named = {what: name in flat for name, what in hostile.items()}
    stats = flow_env.stats
    print(
        f"\nFLEET hostile-claims: exit {done.returncode}; generations {stats.generations}, "
        f"distinct {len(stats.generated)} of {len(prompts)}; wall {wall:.1f} s; peak RSS of the "
        f"CLI {rss_mb:.0f} MB; warnings naming {named}; pytest RUSAGE_CHILDREN "
        f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB; "
        f"claims left {_claims(out)}"
    )
    print("\n".join(line for line in stderr.splitlines() if "ignoring" in line))
    assert done.returncode == 0, stderr[-3000:]
    assert "Traceback" not in done.stdout + stderr
    assert stats.generations == len(prompts)
    assert set(stats.generated.values()) == {1} and len(stats.generated) == len(prompts)
    records = _manifest(out / "manifest.jsonl")
    assert sorted(r["cache_key"] for r in records) == sorted(keys)  # the keys planted on
    assert all(r["finish_reason"] == "SUCCESS" and not r["cached"] for r in records)
    assert len(_images(out)) == len(prompts)
    assert all(named.values()), stderr[-3000:]
    assert rss_mb < 600
    # The planted leases were taken over and released with the image: none is left.
    assert not [c for c in _claims(out) if c.endswith(".lease")]


def test_a_folder_named_like_a_lease_does_not_hang_a_run(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    prompts = [f"a fleet egret behind a folder lease {i}" for i in range(2)]
    keys = _cache_keys(prompts)
    out = tmp_path / "out"
    (out / "claims" / f"{keys[0]}.0.lease").mkdir(parents=True)
    started = time.perf_counter()
    process = subprocess.Popen(
        [*CLI, "run", "--to", str(out), "-y", *_prompt_args(prompts)],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=40)  # a run of 2 images takes ~5 s
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate(timeout=30)
    wall = time.perf_counter() - started
    stats = flow_env.stats
    print(
        f"\nFLEET folder-named-like-a-lease: exit {process.returncode}; generations "
        f"{stats.generations}, distinct {len(stats.generated)} of {len(prompts)}; wall "
        f"{wall:.1f} s; waiting lines printed {stderr.count('waiting for')}"
    )
    assert process.returncode == 0, stderr[-2000:]
    assert stats.generations == len(prompts)


# --------------------------------------------------------------------------------------------
# 3. Ctrl-C while waiting for another run's images: manifest written, exit 130
# --------------------------------------------------------------------------------------------


class _Stderr:
    """A child's stderr as a pseudo-terminal (the CLI draws its live progress bar, and the
    waiting line in it, on a terminal) or as a pipe (a scheduler's log). A thread drains it;
    `text` is what was shown so far."""

    def __init__(self, kind: str) -> None:
        self.master, self.slave = pty.openpty() if kind == "terminal" else os.pipe()
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, daemon=True)

    def start(self) -> None:
        """Once the child holds the writing end: only it may, or EOF would never come."""
        os.close(self.slave)
        self.slave = -1
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed its terminal
                return
            if not chunk:
                return
            with self._lock:
                self._chunks.append(chunk)

    @property
    def text(self) -> str:
        import re

        with self._lock:
            raw = b"".join(self._chunks).decode("utf-8", "replace")
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "\n", raw)

    def close(self) -> None:
        """Once the child has exited: the rest of its output, then the reading end closed."""
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for fd in (self.master, self.slave):  # the writing end too, if no child ever took it
            with contextlib.suppress(OSError):
                os.close(fd)
        self.master = self.slave = -1


@pytest.mark.parametrize("stderr_kind", ["terminal", "pipe"])
def test_ctrl_c_while_waiting_for_another_run_writes_the_manifest_and_exits_130(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any, stderr_kind: str
) -> None:
    prompts = [f"a fleet stork held by the first run {i}" for i in range(3)]
    out = tmp_path / "out"
    args = ["run", "--to", str(out), "-c", "3", "-y", *_prompt_args(prompts)]
    # The first run holds all three images for 25 s: the second finds every one taken.
    flow_env.configure(latency_s=25)
    first_log = tmp_path / "first.log"
    started = time.perf_counter()
    with first_log.open("wb") as sink:
        first = subprocess.Popen(
            [*CLI, *args], env=cli_env, stdout=sink, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    shown_err = _Stderr(stderr_kind)
    second: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 120
        while len([c for c in _claims(out) if c.endswith(".lease")]) < len(prompts):
            assert first.poll() is None, first_log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no leases: {_claims(out)}"
            flow_env.stats.wait_for(lambda s: s.in_flight >= len(prompts), 0.2)
        second = subprocess.Popen(
            [*CLI, *args], env=cli_env, stdout=subprocess.PIPE, stderr=shown_err.slave,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        shown_err.start()
        deadline = time.monotonic() + 90
        while "waiting for" not in shown_err.text:
            assert second.poll() is None, shown_err.text[-3000:]
            assert time.monotonic() < deadline, "no waiting line:\n" + shown_err.text[-3000:]
            with contextlib.suppress(subprocess.TimeoutExpired):
                second.wait(0.2)  # a poll interval that returns if it exits
        waiting_after = time.perf_counter() - started
        # Still waiting: the first run has stored nothing yet.
        assert not _images(out) and first.poll() is None
        second.send_signal(signal.SIGINT)
        stdout, _ = second.communicate(timeout=60)
        interrupted_after = time.perf_counter() - started
        shown_err.close()
        records = _manifest(out / "manifest.jsonl")  # before the first run writes its own
        own = _manifest(next((out / "runs").glob("*/manifest.jsonl")))
        generations_at_interrupt = flow_env.stats.generations
        first_done = first.wait(timeout=120)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        shown_err.close()
    shown = shown_err.text
    waiting_lines = [x.strip() for x in shown.splitlines() if "waiting for" in x]
    print(
        f"\nFLEET ctrl-c-while-waiting ({stderr_kind}): second run exit {second.returncode} "
        f"after SIGINT; waiting line shown at {waiting_after:.1f} s; second ended at "
        f"{interrupted_after:.1f} s; "
        f"manifest lines {len(records)}; generations at interrupt {generations_at_interrupt}, "
        f"after the first run {flow_env.stats.generations}, distinct "
        f"{len(flow_env.stats.generated)}; first run exit {first_done}; "
        f"waiting line: {max(waiting_lines, key=len, default=None)!r}"
    )
    assert second.returncode == 130, shown[-3000:]
    assert "Traceback" not in shown + stdout.decode()
    assert "interrupted" in shown
    for manifest in (records, own):
        assert len(manifest) == len(prompts)
        assert all("interrupted" in (r["error"] or "") for r in manifest), manifest
        assert all(r["finish_reason"] == "ERROR" and r["api_calls"] == 0 for r in manifest)
    assert generations_at_interrupt == 0  # the second run paid for nothing
    # The first run finished its images, each paid once.
    assert first_done == 0, first_log.read_text()[-3000:]
    assert flow_env.stats.generations == len(prompts) == len(flow_env.stats.generated)
    assert len(_images(out)) == len(prompts)


# --------------------------------------------------------------------------------------------
# 4. A claims/ that cannot be written: the run fails before any generation, naming it
# --------------------------------------------------------------------------------------------


def test_an_unwritable_claims_folder_fails_the_run_before_any_generation(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "claims").write_text("a file where the claims folder should be\n")  # we run as root
    prompts = [f"a fleet crane with nowhere to claim {i}" for i in range(3)]

    done, wall, rss_mb = _run_measured(
        ["run", "--to", str(out), *_prompt_args(prompts)], cli_env, tmp_path
    )
    message = "".join((done.stdout + done.stderr).split())
    print(
        f"\nFLEET unwritable-claims: exit {done.returncode}; generations "
        f"{flow_env.stats.generations}; wall {wall:.1f} s; peak RSS {rss_mb:.0f} MB; "
        f"stderr: {done.stderr.strip()[-400:]!r}"
    )
    assert done.returncode != 0
    assert flow_env.stats.generations == 0 and flow_env.stats.requests == 0
    assert str(out / "claims") in message, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert not _images(out)
