"""The claims protocol's parts, each against a real store: a local folder and a moto S3 server.

The fleet scenarios (overlapping CLI runs, slow writes, skewed clocks, dying workers) are in
test_fleet*.py; these pin the primitives they rely on.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from flux_flows.planning import claims
from flux_flows.planning.claims import Holder, Lease, Taken
from flux_flows.storage import LocalStorage, S3Storage, Storage

CACHE_KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "dest")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, "dest")


def test_create_is_atomic_one_of_many_racing_writers_wins(store: Storage) -> None:
    wins: list[int] = []
    start = threading.Barrier(8)

    def racer(n: int) -> None:
        start.wait()
        if store.create("claims/x.0.lease", str(n).encode(), content_type="text/plain"):
            wins.append(n)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    assert store.get("claims/x.0.lease") == str(wins[0]).encode()  # the winner's bytes, whole
    assert not store.create("claims/x.0.lease", b"late", content_type="text/plain")


def test_age_is_read_on_the_disks_clock_not_this_processs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(S3's `Date` is the moto server's, which runs in this process here: the fleet tests run
    a skewed client in a child process against it instead.)"""
    store = LocalStorage(tmp_path)
    store.put("claims/holder-a.json", b"{}", content_type="application/json")
    monkeypatch.setattr(time, "time", lambda: 4e9)  # this process's clock: the year 2096
    age = store.age_s("claims/holder-a.json")
    assert age is not None and age < 5
    assert store.age_s("claims/holder-missing.json") is None


def test_a_local_holder_file_not_rewritten_for_a_lease_is_old(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("claims/holder-a.json", b"{}", content_type="application/json")
    old = time.time() - 500
    os.utime(store.uri_for("claims/holder-a.json"), (old, old))
    age = store.age_s("claims/holder-a.json")
    assert age is not None and 495 < age < 520


def _holder_json(**changes: object) -> bytes:
    fields = {
        "token": "ab" * 16,
        "run_id": "r",
        "host": "h",
        "boot_id": "b",
        "pid_ns": "pid:[1]",
        "pid": 10,
        "start_ticks": 5,
    }
    return json.dumps(fields | changes).encode()


@pytest.mark.parametrize(
    "changes",
    [{"pid": "1"}, {"pid": True}, {"pid": -3}, {"token": "../../x"}, {"run_id": 7}],
    ids=["pid-string", "pid-bool", "pid-negative", "token-path", "run-id-int"],
)
def test_a_holder_file_with_wrong_types_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Holder.from_json(_holder_json(**changes))


def test_a_pid_proves_death_only_on_this_machine_and_pid_namespace() -> None:
    me = Holder.of_this_process("r")
    assert not me.provably_dead()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = Holder(**{**me.__dict__, "pid": dead.pid, "start_ticks": me.start_ticks})
    assert gone.provably_dead()
    # The same PID in another PID namespace (a container with the same hostname), or on
    # another boot of the machine: nothing can be told from it.
    assert not Holder(**{**gone.__dict__, "pid_ns": "pid:[999]"}).provably_dead()
    assert not Holder(**{**gone.__dict__, "boot_id": "another-boot"}).provably_dead()
    # A recycled PID: the process now at that number started at another time.
    recycled = Holder(**{**me.__dict__, "start_ticks": (me.start_ticks or 0) + 1})
    assert recycled.provably_dead()


def _other_holder(store: Storage, *, run_id: str = "other-run", alive: bool = True) -> Holder:
    """A holder file as another live process on another machine would have written it."""
    holder = Holder(
        token="cd" * 16,
        run_id=run_id,
        host="elsewhere",
        boot_id="another-machine",
        pid_ns="pid:[1]",
        pid=1,
        start_ticks=1,
    )
    if alive:
        store.put(claims.holder_key(holder.token), holder.to_json(), content_type="a/json")
    return holder


def test_a_live_holders_lease_is_taken_and_a_released_one_is_free(store: Storage) -> None:
    other = _other_holder(store)
    store.create(claims.lease_key(CACHE_KEY, 0), other.token.encode(), content_type="t/p")
    outcome = claims.acquire(store, "my-run", CACHE_KEY)
    assert isinstance(outcome, Taken) and "other-run" in outcome.holder
    assert claims.is_taken(store, "my-run", CACHE_KEY) == outcome.holder
    store.delete(claims.lease_key(CACHE_KEY, 0))
    assert claims.is_taken(store, "my-run", CACHE_KEY) is None
    mine = claims.acquire(store, "my-run", CACHE_KEY)
    assert isinstance(mine, Lease)
    mine.release()
    claims.close_heartbeat(store, "my-run")
    # Our lease and holder file are gone; the other process's holder file is its own.
    assert store.list_keys("claims/") == {claims.holder_key(other.token)}


def test_a_silent_holders_lease_is_taken_over_by_the_next_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStorage(tmp_path)
    other = _other_holder(store)
    store.create(claims.lease_key(CACHE_KEY, 0), other.token.encode(), content_type="t/p")
    monkeypatch.setenv("FLUX_FLOWS_CLAIM_LEASE_S", "60")
    assert isinstance(claims.acquire(store, "my-run", CACHE_KEY), Taken)
    old = time.time() - 61  # its holder stopped renewing a lease ago (by the disk's clock)
    os.utime(store.uri_for(claims.holder_key(other.token)), (old, old))
    lease = claims.acquire(store, "my-run", CACHE_KEY)
    assert isinstance(lease, Lease) and lease.epochs == [0, 1]
    assert store.get(claims.lease_key(CACHE_KEY, 1)).decode() == lease.beat.holder.token
    lease.release()
    claims.close_heartbeat(store, "my-run")
    assert store.list_keys("claims/") == {claims.holder_key(other.token)}


HostileFile = Callable[[Storage, str], None]


def _wrong_types(store: Storage, token: str) -> None:
    store.put(claims.holder_key(token), _holder_json(token=token, pid="1"), content_type="a/j")


def _huge(store: Storage, token: str) -> None:
    if isinstance(store, LocalStorage):
        path = Path(store.uri_for(claims.holder_key(token)))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.truncate(1_500_000_000)  # sparse: 1.5 GB long, nothing written
    else:
        store.put(claims.holder_key(token), b"{" + b" " * 100_000, content_type="a/j")


def _not_json(store: Storage, token: str) -> None:
    store.put(claims.holder_key(token), b"\x00\xff not json", content_type="a/j")


@pytest.mark.parametrize("hostile", [_wrong_types, _huge, _not_json])
def test_hostile_claims_files_are_skipped_with_a_warning_naming_them(
    store: Storage, hostile: HostileFile, caplog: pytest.LogCaptureFixture
) -> None:
    token = "ef" * 16
    hostile(store, token)
    store.create(claims.lease_key(CACHE_KEY, 0), token.encode(), content_type="t/p")
    store.create(claims.lease_key("f" * 32, 0), b"garbage, not a token", content_type="t/p")
    with caplog.at_level(logging.WARNING, logger="flux_flows.planning.claims"):
        first = claims.acquire(store, "my-run", CACHE_KEY)
        second = claims.acquire(store, "my-run", "f" * 32)
    assert isinstance(first, Lease) and isinstance(second, Lease)
    assert f"holder-{token}.json" in caplog.text
    assert f"{'f' * 32}.0.lease" in caplog.text
    first.release()
    second.release()
    claims.close_heartbeat(store, "my-run")


def test_an_unwritable_claims_folder_is_found_before_any_spend(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    (tmp_path / "claims").write_text("a file where the folder should be")
    with pytest.raises(claims.ClaimsUnwritableError, match="claims"):
        claims.check_claims_writable(store)


def test_a_ctrl_c_during_a_retry_pass_ends_the_wait(tmp_path: Path) -> None:
    """While waiting, one image came free and was rendered again, and that pass was stopped by a
    Ctrl-C: the run stops waiting for the image a live run still holds, instead of waiting on."""
    from flux_flows.models import FinishReason
    from flux_flows.planning.plan import BatchPlan, PlannedImage, plan_images
    from flux_flows.planning.sources import normalize_prompts
    from flux_flows.rendering.one_image import RenderResult, taken_result
    from flux_flows.rendering.overlap import settle_taken
    from flux_flows.rendering.progress import ProgressReporter
    from flux_flows.rendering.window import INTERRUPTED
    from flux_flows.settings import BatchSettings

    store = LocalStorage(tmp_path)
    held, free = plan_images(normalize_prompts(["a held egret", "a free egret"]), BatchSettings())
    plan = BatchPlan(
        images=[held, free],
        unique={held.cache_key: held, free.cache_key: free},
        stored={},
        to_generate=[held.cache_key, free.cache_key],
    )
    other = _other_holder(store)  # alive, on another machine: it keeps its lease
    store.create(claims.lease_key(held.cache_key, 0), other.token.encode(), content_type="t/p")
    results = {p.cache_key: taken_result(p.cache_key, "run other-run") for p in (held, free)}
    passes: list[list[str]] = []

    def render_again(images: Sequence[PlannedImage]) -> dict[str, RenderResult]:
        keys = [p.cache_key for p in images]
        passes.append(keys)
        return {k: RenderResult(k, FinishReason.ERROR, error=INTERRUPTED) for k in keys}

    done: dict[str, RenderResult] = {}
    waiter = threading.Thread(
        target=lambda: done.update(
            settle_taken(
                plan, store, "my-run", results, render_again, ProgressReporter(0), poll_s=0.05
            )
        ),
        daemon=True,
    )
    waiter.start()
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "still waiting for the held image after the Ctrl-C"
    assert passes == [[free.cache_key]]
    assert {r.error for r in done.values()} == {INTERRUPTED} and len(done) == 2
    claims.close_heartbeat(store, "my-run")


def test_images_take_and_give_back_leases_while_the_holder_file_is_rewritten(
    tmp_path: Path,
) -> None:
    """The heartbeat rewrites its holder file outside its lock: while a rewrite hangs on a slow
    store, images still take and give back leases. Closing then waits for the rewrite and
    deletes the file, so no holder file outlives its heartbeat."""
    rewriting, finish = threading.Event(), threading.Event()

    class SlowRewrites(LocalStorage):
        def put(self, key: str, data: bytes, *, content_type: str, metadata: Any = None) -> str:
            if threading.current_thread().name == "flux-claims":  # the renewal thread
                rewriting.set()
                finish.wait(30)
            return super().put(key, data, content_type=content_type, metadata=metadata)

    store = SlowRewrites(tmp_path / "dest")
    beat = claims.Heartbeat(store, "run-1", lease=0.04)  # a rewrite every 10 ms
    beat.acquire()  # writes the holder file and starts renewing it
    took = threading.Event()

    def image() -> None:
        beat.acquire()
        beat.release()
        took.set()

    try:
        assert rewriting.wait(10)
        threading.Thread(target=image, daemon=True).start()
        assert took.wait(10), "an image waited for the holder file's rewrite"
        beat.release()
        closing = threading.Thread(target=beat.close)
        closing.start()
    finally:
        finish.set()
    closing.join(10)
    assert not closing.is_alive()
    assert not store.exists(claims.holder_key(beat.holder.token))
