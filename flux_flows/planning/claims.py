"""Runs that overlap in one destination never pay twice for an image: a lease per image.

The protocol (written down in RELIABILITY.md, "The claims protocol"):

- Before it pays for an image, a process creates `claims/<cache_key>.<epoch>.lease` with an
  atomic create-if-absent (S3 `If-None-Match: *`, a hard link on disk). Only one writer can
  create a given name, so two processes can never both hold one image. The lease names its
  *holder*, and is deleted once the image is stored (or has failed).
- After it holds the lease, the process checks the destination once more: an image stored
  by a run that released its lease a moment ago is taken as found, never paid for again.
- A holder is one process of one run. It writes `claims/holder-<token>.json` before its first
  lease and rewrites it every `lease_s / 4` while it holds any; it deletes it after its last.
- A process that finds a lease taken reads its holder's file. The holder is alive while that
  file was rewritten within `lease_s`, judged by the store's clock (S3 `Last-Modified` against
  the `Date` of the same answer; a file's mtime against a probe's), never by either writer's
  own clock. A holder on this same machine and PID namespace (same boot id, same
  `/proc/self/ns/pid`) whose process is gone, or is another process now, is dead at once.
- A dead holder's image is taken over by creating the next epoch's lease, again atomically.
- A lease is held only while its image is being generated and stored, never while its holder
  waits for anything, so no two runs can wait on each other: the batch comes back to an image
  whose lease was live after its own work, and takes it over once the holder stops renewing.

Anything in `claims/` may have been written by another process, or by hand: files are read up
to `MAX_CLAIM_BYTES`, their fields' types checked, and a bad one is logged by name and taken
for no holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from flux_flows.errors import StorageError
from flux_flows.settings import seconds_from_env
from flux_flows.storage import Storage

logger = logging.getLogger("flux_flows.planning.claims")

CLAIMS = "claims/"
LEASE_S = 120.0
MAX_CLAIM_BYTES = 4096
_TAKEOVER_ATTEMPTS = 5
_LEASE_RE = re.compile(r"^claims/([0-9a-f]{32})\.(\d{1,6})\.lease$")
_TOKEN_RE = re.compile(r"^[0-9a-f]{32}$")
JSON = "application/json"


def lease_s() -> float:
    """How long a silent holder keeps its images: FLUX_FLOWS_CLAIM_LEASE_S, else LEASE_S."""
    return seconds_from_env("FLUX_FLOWS_CLAIM_LEASE_S", LEASE_S)


class ClaimsUnwritableError(StorageError):
    """The destination's `claims/` folder cannot be written: no image can be claimed safely."""


def _unwritable(storage: Storage, exc: Exception) -> ClaimsUnwritableError:
    return ClaimsUnwritableError(
        f"cannot write in {storage.uri_for(CLAIMS.rstrip('/'))}, where runs into this "
        f"destination coordinate so that none pays twice: {exc}"
    )


def check_claims_writable(storage: Storage) -> None:
    """Write and delete a probe in `claims/`: found before any spend, not at the first image."""
    probe = f"{CLAIMS}probe-{secrets.token_hex(8)}.tmp"
    try:
        storage.put(probe, b"", content_type="text/plain")
        storage.delete(probe)
    except (StorageError, OSError) as exc:
        raise _unwritable(storage, exc) from exc


def _read_proc(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return ""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None if there is none: with the
    PID, it names one process, not whichever process has that number now."""
    stat = _read_proc(f"/proc/{pid}/stat")
    if not stat:
        return None
    with contextlib.suppress(IndexError, ValueError):
        return int(stat.rsplit(")", 1)[1].split()[19])
    return None


@dataclass(frozen=True)
class Holder:
    """One process of one run that holds leases; what others need to judge whether it lives."""

    token: str
    run_id: str
    host: str
    boot_id: str
    pid_ns: str
    pid: int
    start_ticks: int | None

    @classmethod
    def of_this_process(cls, run_id: str) -> Holder:
        pid = os.getpid()
        return cls(
            token=secrets.token_hex(16),
            run_id=run_id,
            host=socket.gethostname(),
            boot_id=_read_proc("/proc/sys/kernel/random/boot_id"),
            pid_ns=_pid_namespace(),
            pid=pid,
            start_ticks=_start_ticks(pid),
        )

    @classmethod
    def from_json(cls, body: bytes) -> Holder:
        """A holder file as written by `to_json`; anything else raises ValueError."""
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        text = ("token", "run_id", "host", "boot_id", "pid_ns")
        for name in text:
            if not isinstance(data.get(name), str):
                raise ValueError(f"{name!r} must be a string")
        if not _TOKEN_RE.match(data["token"]):
            raise ValueError("'token' must be 32 hex digits")
        pid, ticks = data.get("pid"), data.get("start_ticks")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError("'pid' must be a positive integer")
        if ticks is not None and (not isinstance(ticks, int) or isinstance(ticks, bool)):
            raise ValueError("'start_ticks' must be an integer or null")
        return cls(**{name: data[name] for name in text}, pid=pid, start_ticks=ticks)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def provably_dead(self) -> bool:
        """True only when this holder ran on this machine, in this PID namespace, and its process
        is gone or is another process now; a PID from anywhere else proves nothing."""
        me = _this_machine()
        if not self.boot_id or self.start_ticks is None or (self.boot_id, self.pid_ns) != me:
            return False
        return _start_ticks(self.pid) != self.start_ticks

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host})"


def _this_machine() -> tuple[str, str]:
    return _read_proc("/proc/sys/kernel/random/boot_id"), _pid_namespace()


def lease_key(cache_key: str, epoch: int) -> str:
    return f"{CLAIMS}{cache_key}.{epoch}.lease"


def holder_key(token: str) -> str:
    return f"{CLAIMS}holder-{token}.json"


@dataclass(frozen=True)
class Taken:
    """Another live process holds the image: who, as far as its files say."""

    cache_key: str
    holder: str


class Heartbeat:
    """This process's holder file for one run in one destination, renewed while leases are held.

    Shared by every thread of the process that renders for the run (`heartbeat_for`), so the
    store sees one rewrite per `lease_s / 4`, not one per image. It lingers one renewal after
    the last lease is released (the next image usually follows at once), then is deleted.
    """

    def __init__(self, storage: Storage, run_id: str, lease: float) -> None:
        self.storage = storage
        self.holder = Holder.of_this_process(run_id)
        self.lease_s = lease
        self._lock = threading.Lock()
        # The renewal thread writes and deletes outside the lock, so images taking and giving
        # back leases never wait on the store; whoever writes or deletes next waits for it.
        self._renewed = threading.Condition(self._lock)
        self._renewing = False
        self._held = 0
        self._running = False
        self._stop = threading.Event()

    def _write(self) -> None:
        try:
            self.storage.put(
                holder_key(self.holder.token), self.holder.to_json(), content_type=JSON
            )
        except (StorageError, OSError) as exc:
            raise _unwritable(self.storage, exc) from exc

    def acquire(self) -> None:
        """Count one more lease; the holder file exists when this returns."""
        with self._lock:
            if not self._running:
                self._renewed.wait_for(lambda: not self._renewing)  # a last delete lands first
                self._write()
                self._running = True
                self._stop.clear()
                threading.Thread(target=self._renew, name="flux-claims", daemon=True).start()
            self._held += 1

    def release(self) -> None:
        with self._lock:
            self._held = max(0, self._held - 1)

    def _renew(self) -> None:
        """Rewrite the holder file while leases are held; after two idle beats (at most half a
        lease since the last rewrite, so a new lease finds it fresh), delete it and stop."""
        idle_ticks = 0
        while not self._stop.wait(self.lease_s / 4):
            with self._lock:
                idle_ticks = 0 if self._held else idle_ticks + 1
                if 0 < idle_ticks < 2:
                    continue
                last = idle_ticks >= 2
                if last:
                    self._running = False
                self._renewing = True
            try:
                if last:
                    self._delete()
                else:
                    with contextlib.suppress(StorageError):
                        self._write()
            finally:
                with self._lock:
                    self._renewing = False
                    self._renewed.notify_all()
            if last:
                return

    def _delete(self) -> None:
        with contextlib.suppress(StorageError, OSError):
            self.storage.delete(holder_key(self.holder.token))

    def close(self) -> None:
        """Stop renewing and delete the holder file (its leases must be released first)."""
        with self._lock:
            self._stop.set()
            self._renewed.wait_for(lambda: not self._renewing)  # no rewrite after the delete
            if self._running:
                self._running = False
                self._delete()


_HEARTBEATS: dict[tuple[str, str], Heartbeat] = {}
_HEARTBEATS_LOCK = threading.Lock()


def heartbeat_for(storage: Storage, run_id: str) -> Heartbeat:
    """The process's one heartbeat for (destination, run): a Dask or pool worker rendering
    chunks of one run holds all its leases under one holder."""
    key = (storage.root_uri, run_id)
    with _HEARTBEATS_LOCK:
        beat = _HEARTBEATS.get(key)
        if beat is None:
            beat = _HEARTBEATS[key] = Heartbeat(storage, run_id, lease_s())
        return beat


def close_heartbeat(storage: Storage, run_id: str) -> None:
    with _HEARTBEATS_LOCK:
        beat = _HEARTBEATS.pop((storage.root_uri, run_id), None)
    if beat is not None:
        beat.close()


def remove_run_holders(storage: Storage, run_id: str) -> None:
    """At the end of a run, delete the holder files its other processes left (a Dask worker
    that exited, or was killed, before its idle clean-up): its images are all settled now."""
    try:
        keys = storage.list_keys(f"{CLAIMS}holder-")
    except (StorageError, OSError):
        return
    for key in keys:
        body = _read_untrusted(storage, key)
        try:
            holder = Holder.from_json(body) if body else None
        except (ValueError, UnicodeDecodeError):
            continue  # not ours to judge, and not ours to delete
        if holder is not None and holder.run_id == run_id:
            with contextlib.suppress(StorageError, OSError):
                storage.delete(key)


def _read_untrusted(storage: Storage, key: str) -> bytes | None:
    """At most MAX_CLAIM_BYTES of a file another process wrote; None if it is gone or too big."""
    try:
        return storage.get(key, max_bytes=MAX_CLAIM_BYTES)
    except (StorageError, OSError) as exc:
        try:
            gone = storage.age_s(key) is None
        except (StorageError, OSError):
            gone = False  # there, but not even its age can be read: as bad as unreadable
        if not gone:
            logger.warning("ignoring %s: %s", storage.uri_for(key), exc)
        return None


def _epochs(storage: Storage, cache_key: str) -> list[int]:
    found = []
    for key in storage.list_keys(f"{CLAIMS}{cache_key}."):
        match = _LEASE_RE.match(key)
        if match and match.group(1) == cache_key:
            found.append(int(match.group(2)))
    return sorted(found)


def holder_of(storage: Storage, key: str, me: Holder) -> Holder | None:
    """The live holder of lease `key`, or None when it has none (gone, silent, dead, unreadable).

    A lease of this very process and run is never "held" against it: only a chunk retried in a
    process that survived its first attempt meets one, and that attempt is over.
    """
    body = _read_untrusted(storage, key)
    if body is None:
        return None
    token = body.decode("ascii", "replace").strip()
    if not _TOKEN_RE.match(token):
        logger.warning("ignoring %s: not a claims lease", storage.uri_for(key))
        return None
    if token == me.token:
        return None
    age = storage.age_s(holder_key(token))
    if age is None or age > lease_s():
        return None
    found = _read_untrusted(storage, holder_key(token))
    if found is None:
        return None
    try:
        holder = Holder.from_json(found)
    except (ValueError, UnicodeDecodeError) as exc:
        logger.warning(
            "ignoring %s: not a claims holder (%s)", storage.uri_for(holder_key(token)), exc
        )
        return None
    if holder.token != token or holder.provably_dead():
        return None
    return holder


class Lease:
    """One image held by this process: release it once the image is stored or has failed."""

    def __init__(
        self, storage: Storage, cache_key: str, epochs: list[int], beat: Heartbeat
    ) -> None:
        self.storage = storage
        self.cache_key = cache_key
        self.epochs = epochs
        self.beat = beat

    def release(self) -> None:
        """Delete this lease and any dead ones below it; a failed delete leaves a lease whose
        holder file will go silent, which others then take over."""
        for epoch in reversed(self.epochs):
            with contextlib.suppress(StorageError, OSError):
                self.storage.delete(lease_key(self.cache_key, epoch))
        self.beat.release()


def acquire(storage: Storage, run_id: str, cache_key: str) -> Lease | Taken:
    """Hold `cache_key` for this process, or say which live holder has it."""
    beat = heartbeat_for(storage, run_id)
    beat.acquire()
    me = beat.holder
    token = me.token.encode()
    try:
        epoch, unlisted = 0, 0
        for _ in range(_TAKEOVER_ATTEMPTS):
            if storage.create(lease_key(cache_key, epoch), token, content_type="text/plain"):
                return Lease(storage, cache_key, list(range(epoch + 1)), beat)
            epochs = _epochs(storage, cache_key)
            if epoch not in epochs:
                # Released between our create and our listing: try again, once. Twice means
                # something that is not a lease file (a folder) sits at that name: step past it.
                unlisted += 1
                if unlisted >= 2:
                    logger.warning(
                        "ignoring %s: not a claims lease",
                        storage.uri_for(lease_key(cache_key, epoch)),
                    )
                    epoch, unlisted = max([epoch, *epochs]) + 1, 0
                continue
            top = epochs[-1]
            holder = holder_of(storage, lease_key(cache_key, top), me)
            if holder is not None:
                beat.release()
                return Taken(cache_key, holder.describe())
            epoch = top + 1
        beat.release()
        return Taken(cache_key, "other runs (the lease kept changing hands)")
    except ClaimsUnwritableError:
        beat.release()
        raise
    except (StorageError, OSError) as exc:
        beat.release()
        raise _unwritable(storage, exc) from exc


@contextlib.contextmanager
def holding(storage: Storage, run_id: str | None, cache_key: str) -> Iterator[Lease | Taken | None]:
    """`acquire` as a context: the lease (released on exit), a `Taken`, or None for no run."""
    if run_id is None:
        yield None
        return
    outcome = acquire(storage, run_id, cache_key)
    try:
        yield outcome
    finally:
        if isinstance(outcome, Lease):
            outcome.release()


def is_taken(storage: Storage, run_id: str, cache_key: str) -> str | None:
    """Who holds `cache_key` now (None: nobody live), without taking it."""
    me = heartbeat_for(storage, run_id).holder
    epochs = _epochs(storage, cache_key)
    if not epochs:
        return None
    holder = holder_of(storage, lease_key(cache_key, epochs[-1]), me)
    return holder.describe() if holder else None
