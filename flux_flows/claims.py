"""Runs that overlap in one destination never pay twice for an image (issue 16).

A nightly run that is still going when the next starts, or two workers given the same prompts,
would each list the destination, each miss the same images and each pay for them. Before it
generates, a run writes a claim, `claims/<run_id>.json`, naming the cache keys it is about to
pay for, and only then reads the other runs' claims. Every run orders the claims the same way
(oldest first, then by run id), so for each key exactly one live run generates it and the others
wait for it to appear in the destination, whatever the interleaving: a run that listed before
another wrote is the older one, and the younger one sees its claim.

A claim lives for `CLAIM_TTL_S` unless its run renews it (a background thread does, every third
of that); a run on this machine whose process is gone is dead at once. A run that waited for
an image another run was making and then finds that run gone without it generates it itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from flux_flows import layout
from flux_flows.errors import StorageError
from flux_flows.storage import Storage

logger = logging.getLogger("flux_flows.claims")

CLAIMS = "claims/"
CLAIM_TTL_S = 15 * 60.0


@dataclass(frozen=True)
class Claim:
    run_id: str
    host: str
    pid: int
    created: float
    expires: float
    keys: tuple[str, ...]

    def alive(self, now: float) -> bool:
        if now > self.expires:
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return True

    def order(self) -> tuple[float, str]:
        return (self.created, self.run_id)


def _key(run_id: str) -> str:
    return f"{CLAIMS}{layout.slug(run_id, 80)}.json"


class ClaimBook:
    """This run's claim, and what other live runs are generating."""

    def __init__(self, storage: Storage, run_id: str, *, ttl_s: float = CLAIM_TTL_S) -> None:
        self.storage = storage
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.created = time.time()
        self.keys: tuple[str, ...] = ()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _write(self) -> None:
        claim = Claim(
            self.run_id,
            socket.gethostname(),
            os.getpid(),
            self.created,
            time.time() + self.ttl_s,
            self.keys,
        )
        body = json.dumps(asdict(claim)).encode("utf-8")
        self.storage.put(_key(self.run_id), body, content_type="application/json")

    def others(self) -> list[Claim]:
        """The live claims of other runs (unreadable or stale ones are skipped)."""
        now, found = time.time(), []
        for key in self.storage.list_keys(CLAIMS):
            if key == _key(self.run_id) or not key.endswith(".json"):
                continue
            try:
                data = json.loads(self.storage.get(key))
                claim = Claim(**{**data, "keys": tuple(data["keys"])})
            except (StorageError, OSError, ValueError, TypeError, KeyError):
                continue  # being replaced, or not a claim: it protects nothing
            if claim.alive(now):
                found.append(claim)
        return found

    def stake(self, keys: Iterable[str]) -> set[str]:
        """Claim `keys`; return those an older live run claimed first (this run must wait)."""
        self.keys = tuple(keys)
        if not self.keys:
            return set()
        self._write()
        self._start_renewing()
        mine = set(self.keys)
        me = (self.created, self.run_id)
        taken: set[str] = set()
        for claim in self.others():
            if claim.order() < me:
                taken |= mine.intersection(claim.keys)
        return taken

    def claimed_by_others(self, keys: set[str]) -> set[str]:
        """Which of `keys` a live run still claims (the rest: nobody is making them)."""
        held: set[str] = set()
        for claim in self.others():
            held |= keys.intersection(claim.keys)
        return held

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                with contextlib.suppress(StorageError, OSError):
                    self._write()

        self._renewer = threading.Thread(target=renew, name="flux-claim-renewer", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if self.keys:
            with contextlib.suppress(StorageError, OSError):
                self.storage.delete(_key(self.run_id))
