"""Runs of a fleet overlapping in one destination, where the old claims protocol paid twice or hung.

Each test starts real `flux-flows run` processes (the CLI, as a user runs it) against the
emulator, into a local folder or a moto S3 server over HTTP, and checks what the claims protocol
(`flux_flows/planning/claims.py`, `overlap.py`, `render.render`) promises:

- the emulator generated (billed) each distinct image once, plus at most the images in flight
  in a process at the moment it was SIGKILLed;
- every run exits, with the code its images call for;
- no run waits longer than a lease for an image after its holder stops (killed, or failed it).

Children run with a short lease (FLUX_FLOWS_CLAIM_LEASE_S=4) so a lost holder costs seconds.
Each test prints one `FLEET ...` line with its figures (run pytest with `-s` to see them);
RELIABILITY.md copies them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest

from helpers.fleet import (
    Fleet,
    Run,
    applied_offset,
    cli_argv,
    delaying_proxy,
    fleet,
    skewed_clock_env,
)

LEASE_S = 4.0
N = 8
# What an image needs once its lease is free: a poll of the waiting run (1 s), the store's clock
# granularity (1 s), the emulator's latency, the store and a loaded 2-core machine's scheduling.
TAKEOVER_SLACK_S = 8.0
# A run that has its last image still records it, writes its manifest and ends its flow run.
EXIT_SLACK_S = 30.0
RUN_DEADLINE_S = 120.0
_CACHE_KEY = re.compile(r"([0-9a-f]{32})\.[a-z0-9]+$")


# --------------------------------------------------------------------------------------------
# Destinations, runs, figures
# --------------------------------------------------------------------------------------------


class Dest:
    """A local folder or an s3:// prefix, read with plain calls (not the library's storage)."""

    def __init__(self, uri: str, s3_endpoint: str | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.s3 = boto3.client("s3", endpoint_url=s3_endpoint) if s3_endpoint else None

    def keys(self, folder: str) -> set[str]:
        if self.s3 is None:
            root = Path(self.uri)
            found = (p.relative_to(root) for p in (root / folder).rglob("*") if p.is_file())
            # Not a temp file being written or a clock probe (hidden names): only what is there.
            return {k.as_posix() for k in found if not k.name.startswith(".")}
        bucket, _, prefix = self.uri.removeprefix("s3://").partition("/")
        root = f"{prefix}/" if prefix else ""
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=root + folder
        )
        return {o["Key"][len(root) :] for page in pages for o in page.get("Contents", [])}

    def read(self, key: str) -> bytes:
        if self.s3 is None:
            return (Path(self.uri) / key).read_bytes()
        bucket, _, prefix = self.uri.removeprefix("s3://").partition("/")
        full = f"{prefix}/{key}" if prefix else key
        return self.s3.get_object(Bucket=bucket, Key=full)["Body"].read()

    def images(self) -> set[str]:
        return {m.group(1) for k in self.keys("images/") if (m := _CACHE_KEY.search(k))}

    def leases(self) -> set[str]:
        return {k for k in self.keys("claims/") if k.endswith(".lease")}

    def run_manifests(self) -> list[list[dict[str, Any]]]:
        found = sorted(k for k in self.keys("runs/") if k.endswith("/manifest.jsonl"))
        return [[json.loads(x) for x in self.read(k).decode().splitlines()] for k in found]


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Fleet]:
    with fleet(tmp_path) as started:
        yield started


def destination(
    where: str, request: pytest.FixtureRequest | None, tmp_path: Path, cli_env: dict[str, str]
) -> tuple[str, Dest, dict[str, str]]:
    """The destination's URI, a reader of it, and the env of a run writing there (moto's
    endpoint and test credentials for S3: `cli_env` may predate the moto server)."""
    if where == "folder":
        uri = str(tmp_path / "out")
        return uri, Dest(uri), child_env(cli_env)
    assert request is not None
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    uri = f"s3://{bucket}/fleet"
    return uri, Dest(uri, endpoint), child_env(cli_env, **s3_env(endpoint))


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }


def child_env(cli_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {**cli_env, "FLUX_FLOWS_CLAIM_LEASE_S": str(LEASE_S), "PYTHONUNBUFFERED": "1", **extra}
    env.pop("AWS_PROFILE", None)
    return env


def prompts_file(tmp_path: Path, label: str, lines: list[str] | None = None) -> Path:
    path = tmp_path / "prompts.txt"
    rows = lines or [f"a fleet heron {i} ({label})" for i in range(N)]
    path.write_text("".join(f"{row}\n" for row in rows), encoding="utf-8")
    return path


def waiting_for(run: Run) -> bool:
    """The run said it waits for images another live run is generating (`overlap.settle_taken`
    logs it once as it starts waiting)."""
    return "waiting for" in run.output()


def figures(
    label: str, requested: str, distinct: int, generations: int, runs: list[Run], extra: str = ""
) -> str:
    walls = ", ".join(f"{r.name} {r.wall_s:.1f} s (exit {r.returncode})" for r in runs)
    line = (
        f"FLEET {label}: requested {requested}, distinct {distinct}, "
        f"generations {generations}; {walls}{'; ' + extra if extra else ''}"
    )
    print("\n" + line)
    return line


def assert_paid_once(emulator: Any, distinct: int, in_flight_at_kill: int = 0) -> int:
    stats = emulator.stats
    generations = stats.generations
    assert distinct <= generations <= distinct + in_flight_at_kill, stats.as_dict()
    assert len(stats.generated) == distinct, stats.as_dict()
    return generations


def assert_manifests(dest: Dest, count: int, reasons: dict[str, int]) -> None:
    """`count` run manifests, each of N records with these finish reasons (reason -> count)."""
    manifests = dest.run_manifests()
    assert len(manifests) == count
    for records in manifests:
        assert len(records) == N
        seen: dict[str, int] = {}
        for record in records:
            seen[record["finish_reason"]] = seen.get(record["finish_reason"], 0) + 1
        assert seen == reasons, records


# --------------------------------------------------------------------------------------------
# 1. Three overlapping runs; the oldest does not deliver
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_three_runs_the_oldest_sigkilled_mid_run(
    where: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    cli_env: dict[str, str],
    flow_env: Any,
    runs: Fleet,
) -> None:
    """The oldest of three runs of the same 8 prompts holds 2 images in flight, and the two
    younger runs wait for them; the oldest is SIGKILLed. Both younger runs take its images
    over (its PID is gone on this machine: at once) and finish; each image is paid once."""
    uri, dest, env = destination(where, request, tmp_path, cli_env)
    prompts = prompts_file(tmp_path, f"oldest killed, {where}")
    flow_env.configure(latency_s=60.0)  # the oldest's first requests stay in flight until killed
    oldest = runs.start("oldest", cli_argv(prompts, uri, 2), env)
    runs.wait_alive_until(
        lambda: flow_env.stats.in_flight >= 2,
        RUN_DEADLINE_S,
        "the oldest has 2 in flight",
        [oldest],
    )
    flow_env.configure(latency_s=0.3)
    younger = [runs.start(f"younger-{i}", cli_argv(prompts, uri, 4), env) for i in (1, 2)]
    # Both younger runs wait (settle_taken), all but the oldest's 2 images are stored, and the
    # only leases left are the oldest's: each younger run now waits for the oldest alone.
    runs.wait_alive_until(
        lambda: (
            all(waiting_for(r) for r in younger)
            and flow_env.stats.generations == N - 2
            and len(dest.images()) == N - 2
            and len(dest.leases()) == 2
        ),
        RUN_DEADLINE_S,
        "both younger runs wait for the oldest's 2 images",
        [oldest, *younger],
    )
    in_flight = flow_env.stats.in_flight
    oldest.kill()
    assert oldest.killed_at is not None
    took_over = flow_env.stats.wait_for(
        lambda s: s.generations >= N, timeout=LEASE_S + TAKEOVER_SLACK_S
    )
    takeover_s = time.monotonic() - oldest.killed_at
    assert took_over, f"not taken over within {LEASE_S + TAKEOVER_SLACK_S} s\n" + runs.tails()
    runs.finish(younger, RUN_DEADLINE_S)
    for run in younger:
        assert run.returncode == 0, runs.tails()
        assert run.ended is not None and run.ended - oldest.killed_at <= LEASE_S + EXIT_SLACK_S
    generations = assert_paid_once(flow_env, N, in_flight)
    assert len(dest.images()) == N and not dest.leases()
    assert_manifests(dest, 2, {"SUCCESS": N})
    figures(
        f"three runs, the oldest SIGKILLed with {in_flight} in flight ({where})",
        f"{N} x 3 runs",
        N,
        generations,
        runs.runs,
        f"all images stored {takeover_s:.1f} s after the kill; younger runs exited "
        + ", ".join(f"{r.ended - oldest.killed_at:.1f} s" for r in younger if r.ended)
        + " after it",
    )


def _via(proxy_url: str, base_url: str) -> str:
    """`base_url` (origin and path) with the origin of the proxy."""
    parts = urlsplit(base_url)
    return proxy_url + parts.path


def test_three_runs_the_oldest_refused_with_400(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any, runs: Fleet
) -> None:
    """Two of the 8 prompts are refused by the API with a 400 (`[[status:400]]`). The oldest run
    reaches the API through a proxy that holds those two requests, so it holds their leases
    until both younger runs wait for them; then its 400s arrive and it fails them. The younger
    runs must not wait on: each takes the two over, meets the same 400, and all three exit 1
    with 6 images stored and paid once."""
    refused = 2
    lines = [f"a fleet heron {i} (oldest refused)" for i in range(N - refused)]
    lines += [f"a refused fleet heron {i} [[status:400]]" for i in range(refused)]
    prompts = prompts_file(tmp_path, "", lines)
    uri, dest, env = destination("folder", None, tmp_path, cli_env)
    flow_env.configure(latency_s=0.3)

    def hold(method: str, path: str, body: bytes) -> float | None:
        return RUN_DEADLINE_S if b"[[status:400]]" in body else None

    with delaying_proxy(flow_env.base_url, hold) as proxy:
        oldest_env = {**env, "FIREWORKS_BASE_URL": _via(proxy.url, flow_env.base_url)}
        oldest = runs.start("oldest", cli_argv(prompts, uri, 4), oldest_env)
        runs.wait_alive_until(
            lambda: len(proxy.held) == refused and len(dest.images()) == N - refused,
            RUN_DEADLINE_S,
            "the oldest holds the 2 refused prompts' requests and stored the rest",
            [oldest],
        )
        younger = [runs.start(f"younger-{i}", cli_argv(prompts, uri, 4), env) for i in (1, 2)]
        runs.wait_alive_until(
            lambda: all(waiting_for(r) for r in younger) and len(dest.leases()) == refused,
            RUN_DEADLINE_S,
            "both younger runs wait for the oldest's 2 refused images",
            runs.runs,
        )
        assert flow_env.stats.by_status.get(400, 0) == 0  # no 400 answered yet: all held
        released_at = time.monotonic()
        proxy.release.set()  # the oldest's 400s arrive now
        runs.finish(runs.runs, RUN_DEADLINE_S)
    for run in runs.runs:
        assert run.returncode == 1, runs.tails()  # failed images: exit 1, nobody hangs
        assert "Traceback" not in run.output()
    younger_waits = [r.ended - released_at for r in younger if r.ended is not None]
    assert max(younger_waits) <= LEASE_S + EXIT_SLACK_S
    generations = assert_paid_once(flow_env, N - refused)
    refusals = flow_env.stats.by_status.get(400, 0)
    assert refusals == refused * 3  # each run asked once for each refused image, none twice
    assert len(dest.images()) == N - refused and not dest.leases()
    assert_manifests(dest, 3, {"SUCCESS": N - refused, "ERROR": refused})
    figures(
        "three runs, the oldest's 2 of 8 prompts refused with 400 while the younger runs wait",
        f"{N} x 3 runs",
        N - refused,
        generations,
        runs.runs,
        f"{refusals} answers 400 (2 per run); younger runs exited "
        + ", ".join(f"{w:.1f} s" for w in younger_waits)
        + " after the oldest's 400s were let through",
    )


# --------------------------------------------------------------------------------------------
# 2. A slow claim write
# --------------------------------------------------------------------------------------------

SLOW_WRITE_S = 3.0
# A holder's file lands every lease/4 + the write's delay; its age is read on S3's 1-second
# clock: the lease must outlast both (8 > 8/4 + 3 + 1) for a slow writer to look alive.
SLOW_WRITE_LEASE_S = 8.0


@pytest.mark.parametrize("held", ["request", "answer"])
def test_slow_claim_writes_of_one_run_do_not_pay_twice(
    held: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    cli_env: dict[str, str],
    flow_env: Any,
    runs: Fleet,
) -> None:
    """The first run reaches S3 through a proxy that holds each of its PUTs under `claims/`
    (its holder file, its leases) for 3 s: before moto sees it (`request`: the write lands
    late) or after (`answer`: it lands at once, its writer hears so late). The second run,
    started while the first one's claim writes are held, talks to moto directly. Each of the
    8 images is paid once: a late lease create loses (412) or lands after the image is stored
    (found), and a lease whose answer is late is already seen by the other run."""
    uri, dest, env = destination("s3", request, tmp_path, cli_env)
    env["FLUX_FLOWS_CLAIM_LEASE_S"] = str(SLOW_WRITE_LEASE_S)
    prompts = prompts_file(tmp_path, "slow claim write")
    flow_env.configure(latency_s=2.0)  # the second run holds its leases while the first's land

    def hold(method: str, path: str, body: bytes) -> float | None:
        return SLOW_WRITE_S if method == "PUT" and "/claims/" in path else None

    proxied = delaying_proxy(env["AWS_ENDPOINT_URL"], hold, hold_answers=held == "answer")
    with proxied as proxy:
        first = runs.start(
            "first (slow claims)",
            cli_argv(prompts, uri, 4),
            {**env, "AWS_ENDPOINT_URL": proxy.url},
        )
        runs.wait_alive_until(
            lambda: any(h.path.endswith(".lease") for h in proxy.held),
            RUN_DEADLINE_S,
            "the first run creates its first lease",
            [first],
        )
        second = runs.start("second", cli_argv(prompts, uri, 4), env)
        runs.finish(runs.runs, RUN_DEADLINE_S)
        writes = list(proxy.held)
    for run in runs.runs:
        assert run.returncode == 0, runs.tails()
    generations = assert_paid_once(flow_env, N)
    assert len(dest.images()) == N and not dest.leases()
    assert_manifests(dest, 2, {"SUCCESS": N})
    lease_puts = [h for h in writes if h.path.endswith(".lease")]
    lost = sum(1 for h in lease_puts if h.status == 412 or h.status == 409)
    assert lease_puts and all(h.forwarded for h in lease_puts)
    generated_by = {r.name: _row_value(r.output(), "generated (SUCCESS)") for r in (first, second)}
    assert sum(generated_by.values()) == N, generated_by
    figures(
        f"two runs into S3, the first one's claims/ PUTs held {SLOW_WRITE_S:.0f} s each "
        f"({'before moto' if held == 'request' else 'after moto, on the way back'}; "
        f"lease {SLOW_WRITE_LEASE_S:.0f} s)",
        f"{N} x 2 runs",
        N,
        generations,
        runs.runs,
        f"{len(writes)} PUTs held, {len(lease_puts)} of them lease creates ({lost} lost the "
        f"race: 412/409); images generated per run {generated_by}",
    )


def _row_value(output: str, name: str) -> int:
    """A number from the run's summary table."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│|┃ ").replace("┃", "│").split("│")]
        if len(cells) >= 2 and cells[0] == name:
            return int(cells[-1])
    raise AssertionError(f"no row {name!r} in:\n{output[-3000:]}")


# --------------------------------------------------------------------------------------------
# Two runs that each wait for the other: the choreography of scenarios 3 and 4
# --------------------------------------------------------------------------------------------


def _hold_every_call(method: str, path: str, body: bytes) -> float | None:
    return RUN_DEADLINE_S  # until the proxy's `release` is set


def _epochs(dest: Dest) -> list[int]:
    return sorted(int(k.rsplit(".", 2)[-2]) for k in dest.leases())


def each_waits_for_the_other(
    runs: Fleet,
    flow_env: Any,
    uri: str,
    dest: Dest,
    prompts: Path,
    env: dict[str, str],
    *,
    first_env: dict[str, str],
    first_prefix: tuple[str, ...] = (),
    on_first_holding: Callable[[Run], object] | None = None,
) -> tuple[Run, Run]:
    """Two runs of the same 8 prompts, each reaching the API through a proxy that holds its
    calls until the test lets them through, so each run meets the other's live leases:

    1. the first run (2 in flight) holds images 0-1, its calls held;
    2. the second (4 in flight) finds 0-1 taken, holds 2-5, its calls held: it judged the
       first alive (all leases are still epoch 0);
    3. the first's calls go through: it stores 0-1, finds 2-5 taken, makes 6-7 and waits for
       2-5: it judged the second alive (still epoch 0 only);
    4. the second's calls go through; both finish. Each image is paid once.
    """
    base = flow_env.base_url
    flow_env.configure(latency_s=0.3)
    with (
        delaying_proxy(base, _hold_every_call) as to_first,
        delaying_proxy(base, _hold_every_call) as to_second,
    ):
        first = runs.start(
            "first",
            cli_argv(prompts, uri, 2),
            {**env, **first_env, "FIREWORKS_BASE_URL": _via(to_first.url, base)},
            prefix=first_prefix,
        )
        runs.wait_alive_until(
            lambda: len(to_first.held) == 2 and len(dest.leases()) == 2,
            RUN_DEADLINE_S,
            "the first run holds 2 images, its calls held",
            [first],
        )
        if on_first_holding is not None:
            on_first_holding(first)
        second = runs.start(
            "second",
            cli_argv(prompts, uri, 4),
            {**env, "FIREWORKS_BASE_URL": _via(to_second.url, base)},
        )
        runs.wait_alive_until(
            lambda: len(to_second.held) == 4 and len(dest.leases()) == 6,
            RUN_DEADLINE_S,
            "the second run holds 4 more images, its calls held",
            [first, second],
        )
        assert _epochs(dest) == [0] * 6, "the second run took over a live first run's image"
        assert flow_env.stats.requests == 0
        to_first.release.set()
        runs.wait_alive_until(
            lambda: waiting_for(first) and flow_env.stats.generations == 4,
            RUN_DEADLINE_S,
            "the first run stores 0-1 and 6-7 and waits for the second's 2-5",
            [first, second],
        )
        assert _epochs(dest) == [0] * 4, "the first run took over a live second run's image"
        to_second.release.set()
        runs.finish([first, second], RUN_DEADLINE_S)
    for run in (first, second):
        assert run.returncode == 0, runs.tails()
    # The second run waited at its end: for 0-1, the only images the first held after step 2,
    # so it did meet the first's leases there (not only after the first had let them go).
    assert waiting_for(second), runs.tails()
    assert len(dest.images()) == N and not dest.leases()
    assert_manifests(dest, 2, {"SUCCESS": N})
    return first, second


# --------------------------------------------------------------------------------------------
# 3. Clock skew
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["folder", "s3"])
@pytest.mark.parametrize("offset_s", [-120.0, -1200.0], ids=["2-min-behind", "20-min-behind"])
def test_a_run_whose_clock_is_behind_overlapping_a_normal_run(
    offset_s: float,
    where: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    cli_env: dict[str, str],
    flow_env: Any,
    runs: Fleet,
) -> None:
    """The first run's `time.time` is 2 or 20 minutes behind (a sitecustomize on PYTHONPATH);
    it holds images the normal run waits for and waits for the normal run's images. Liveness
    is judged on the store's clock only: neither takes over a live holder's image."""
    uri, dest, env = destination(where, request, tmp_path, cli_env)
    prompts = prompts_file(tmp_path, f"skew {offset_s:.0f} s, {where}")
    clock = tmp_path / "skewed-clock"
    skew = skewed_clock_env(clock, offset_s)
    first, second = each_waits_for_the_other(
        runs, flow_env, uri, dest, prompts, env, first_env=skew
    )
    applied = applied_offset(clock, first.pid)
    assert applied is not None and abs(applied - offset_s) < 1.0, applied
    assert applied_offset(clock, second.pid) is None
    generations = assert_paid_once(flow_env, N)
    figures(
        f"two runs, the first one's clock {-offset_s / 60:.0f} min behind ({where})",
        f"{N} x 2 runs",
        N,
        generations,
        runs.runs,
        f"the first run's time.time was {applied:+.0f} s off; each waited for the other",
    )


# --------------------------------------------------------------------------------------------
# 4. A run in another PID namespace
# --------------------------------------------------------------------------------------------

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc")


@pytest.fixture(scope="module")
def pid_namespace() -> tuple[str, ...]:
    """The prefix that runs a command in a new PID namespace, or a skip saying why not."""
    import os
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) on this machine")
    if os.geteuid() != 0:
        pytest.skip("unshare --pid needs root here (not running as root)")
    probe = subprocess.run(
        [*UNSHARE, "sh", "-c", "echo $$; readlink /proc/self/ns/pid"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"`{' '.join(UNSHARE)} true` fails here: {probe.stderr.strip()[:300]}")
    pid, namespace = probe.stdout.split()
    if pid != "1" or namespace == os.readlink("/proc/self/ns/pid"):
        pytest.skip(f"unshare ran the command as pid {pid} in {namespace}: not a new namespace")
    return UNSHARE


def _holders(dest: Dest) -> list[dict[str, Any]]:
    found = []
    for key in dest.keys("claims/"):
        if key.rsplit("/", 1)[-1].startswith("holder-"):
            try:
                found.append(json.loads(dest.read(key)))
            except (OSError, ValueError):
                continue  # rewritten or deleted as it was read
    return found


def _check_namespaced_holder(dest: Dest) -> dict[str, Any]:
    """The holder file of the run in the other namespace: pid 1 there, another namespace."""
    import os

    ours = os.readlink("/proc/self/ns/pid")
    holders = _holders(dest)
    assert len(holders) == 1, holders
    holder = holders[0]
    assert holder["pid_ns"] != ours and holder["pid"] == 1, holder
    return holder


def test_a_run_in_another_pid_namespace_overlapping_a_normal_run(
    pid_namespace: tuple[str, ...],
    tmp_path: Path,
    cli_env: dict[str, str],
    flow_env: Any,
    runs: Fleet,
) -> None:
    """The first run is pid 1 of its own PID namespace (same machine, same hostname, same boot
    id): its PID means nothing outside, and ours nothing inside. It holds images the normal
    run waits for and waits for the normal run's images; neither takes over the other's."""
    uri, dest, env = destination("folder", None, tmp_path, cli_env)
    prompts = prompts_file(tmp_path, "pid namespace")
    seen: dict[str, Any] = {}
    each_waits_for_the_other(
        runs,
        flow_env,
        uri,
        dest,
        prompts,
        env,
        first_env={},
        first_prefix=pid_namespace,
        on_first_holding=lambda _: seen.update(_check_namespaced_holder(dest)),
    )
    generations = assert_paid_once(flow_env, N)
    figures(
        "two runs, the first one pid 1 in its own PID namespace (folder)",
        f"{N} x 2 runs",
        N,
        generations,
        runs.runs,
        f"the first run's holder: pid {seen['pid']} in {seen['pid_ns']}; each waited for the other",
    )


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_run_in_another_pid_namespace_sigkilled_is_taken_over_after_its_lease(
    where: str,
    pid_namespace: tuple[str, ...],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    cli_env: dict[str, str],
    flow_env: Any,
    runs: Fleet,
) -> None:
    """The first run, pid 1 of its own PID namespace, holds 2 images (its calls held by a
    proxy) and is SIGKILLed while the normal run waits for them. No PID can prove it dead from
    here: the normal run takes them over once its holder file is a lease old, by the store's
    clock, and finishes; each image is paid once."""
    uri, dest, env = destination(where, request, tmp_path, cli_env)
    prompts = prompts_file(tmp_path, f"pid namespace, killed, {where}")
    base = flow_env.base_url
    flow_env.configure(latency_s=0.3)
    seen: dict[str, Any] = {}
    with delaying_proxy(base, _hold_every_call) as to_first:
        first = runs.start(
            "first",
            cli_argv(prompts, uri, 2),
            {**env, "FIREWORKS_BASE_URL": _via(to_first.url, base)},
            prefix=pid_namespace,
        )
        runs.wait_alive_until(
            lambda: len(to_first.held) == 2 and len(dest.leases()) == 2,
            RUN_DEADLINE_S,
            "the first run holds 2 images, its calls held",
            [first],
        )
        seen.update(_check_namespaced_holder(dest))
        second = runs.start("second", cli_argv(prompts, uri, 4), env)
        runs.wait_alive_until(
            lambda: (
                waiting_for(second)
                and flow_env.stats.generations == N - 2
                and len(dest.leases()) == 2
            ),
            RUN_DEADLINE_S,
            "the second run makes 6 images and waits for the first's 2",
            [first, second],
        )
        first.kill()
        assert first.killed_at is not None
        took_over = flow_env.stats.wait_for(
            lambda s: s.generations >= N, timeout=LEASE_S + TAKEOVER_SLACK_S
        )
        takeover_s = time.monotonic() - first.killed_at
        assert took_over, f"not taken over within {LEASE_S + TAKEOVER_SLACK_S} s\n" + runs.tails()
        runs.finish([second], RUN_DEADLINE_S)
    assert second.returncode == 0, runs.tails()
    assert second.ended is not None
    # Not before the holder file went silent for a lease (less the renewal it had done):
    # no PID from another namespace was taken for proof of death.
    assert takeover_s >= LEASE_S * 3 / 4 - 1.0, takeover_s
    generations = assert_paid_once(flow_env, N)
    assert flow_env.stats.requests == N  # the killed run's 2 calls never reached the API
    assert len(dest.images()) == N and not dest.leases()
    assert_manifests(dest, 1, {"SUCCESS": N})
    figures(
        f"two runs, the first one pid 1 in its own PID namespace, SIGKILLed holding 2 ({where})",
        f"{N} x 2 runs",
        N,
        generations,
        runs.runs,
        "the killed run's 2 calls never reached the API; its images were "
        f"taken over {takeover_s:.1f} s after the kill (lease {LEASE_S:.0f} s); the second run "
        f"exited {second.ended - first.killed_at:.1f} s after it",
    )
