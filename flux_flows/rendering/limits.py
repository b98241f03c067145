"""The user's account-wide limits, shared by every run and worker through the Prefect API, taken
in blocks so they cost a few Prefect calls per run rather than one or two per image.

- `concurrency_limit` names a Prefect global concurrency limit: at most that many requests in
  flight for the whole account. A batch (or a chunk, on a Dask worker or a work pool) holds
  leases of *many* slots: as many as its in-flight window can use, taken a block at a time
  (a quarter of its `max_concurrency`, or what is free) by a background thread, so images that
  already have slots never wait for one. A request is only sent while the batch holds a slot
  for it. The leases are renewed while held, given back as the window shrinks (the end of the
  batch, a 429 back-off, a Ctrl-C) and all released at the end; a killed holder's slots come
  back when its lease expires (`SLOT_LEASE_S`, at least the 60 s the Prefect server allows).
- `rate_limit` names a global concurrency limit *with slot decay* (Prefect's rate limiting): its
  `limit` is the burst, its `slot_decay_per_second` the sustained rate. A batch takes `k`
  tokens at once (`RATE_TAKE_S` of the limit's rate, never more than its burst) and sends one
  request per token, as soon as its window and pace allow. The limit is read (not written)
  until it has room for the take, and only then incremented: on the Prefect server every write
  to a decaying limit loses the fraction of a slot decayed since the last one, and a refused
  increment loses *all* the decay since then, so polling by increments (what
  `prefect.concurrency.sync.rate_limit` does on 423) would run well under the rate.

How to size a rate limit, and the checks of the limits' settings before a run, are in
`limit_settings`.

One `SharedLimits` per windowed loop (`window.render_windowed`): one process, one Dask chunk
or one work-pool chunk run, each holding its blocks for its life.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

from flux_flows.rendering.limit_settings import (
    AccountLimits,
    LimitError,
    lease_s,
    missing_message,
    read_limit,
)

__all__ = ["RENEW_FRACTION", "SharedLimits", "sharing"]

logger = logging.getLogger("flux_flows.rendering.limits")

# Leased slots are renewed every RENEW_FRACTION of their lease (`limit_settings.lease_s`).
RENEW_FRACTION = 0.5
# A batch takes its concurrency slots in blocks of max_concurrency / BLOCKS_PER_WINDOW.
BLOCKS_PER_WINDOW = 4
# While a concurrency limit is full, it is read (a GET, no write) this often.
FULL_POLL_S = 0.5
# A rate take covers this many seconds of the limit's sustained rate (at most its burst).
RATE_TAKE_S = 2.0
# A read of a rate limit that shows too little room is repeated when enough will have decayed,
# plus this much (the server floors the decayed count).
RATE_MARGIN_S = 0.01
# Prefect API errors (connection, 5xx) are retried with backoff up to this long, then the batch
# stops sending (what is in flight finishes) and says why.
GIVE_UP_S = 300.0


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transient(exc: BaseException) -> bool:
    """A Prefect API failure worth retrying: no answer, or a 5xx."""
    import httpx

    if isinstance(exc, httpx.TransportError | TimeoutError | ConnectionError):
        return True
    status = _status(exc)
    return status is not None and status >= 500


class SharedLimits:
    """A windowed loop's share of the account limits: slots held in leased blocks, rate tokens.

    The loop (one thread) calls `want` each turn with what its window could use, `may_send`
    before each request and `sent` after; a daemon thread does every Prefect call (take,
    renew, give back) and calls `wake` when it got something, so the loop never waits on the
    Prefect API itself. `error` is set when a limit can no longer be taken.
    """

    def __init__(
        self,
        limits: AccountLimits,
        max_concurrency: int,
        wake: Callable[[], None] = lambda: None,
        *,
        holder: UUID | str | None = None,
    ) -> None:
        self.concurrency = limits.concurrency_limit
        self.rate = limits.rate_limit
        self.block = max(1, math.ceil(max_concurrency / BLOCKS_PER_WINDOW))
        self.lease_s = lease_s()
        self._wake = wake
        self._holder = holder
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        # Concurrency: leases held (id -> slots, renew-at), leases to give back.
        self._leases: dict[UUID, list[Any]] = {}
        self.held = 0 if self.concurrency else math.inf
        self._release: list[UUID] = []
        self._target = 0
        self._take_at = 0.0  # the next take of slots (after a full limit)
        # Rate: tokens in hand, images still to send, the next take.
        self.credits: float = 0 if self.rate else math.inf
        self._pending = 0
        self._rate_at = 0.0
        self._rate_k = 1
        self._decay = 0.0
        self._failing_since: float | None = None
        # Figures for the run's log: Prefect calls made, slots at most.
        self.calls = 0
        self.max_held = 0

    # -- the loop's side (never makes a Prefect call) ---------------------------------------

    def want(self, in_flight: int, target: int, pending: int) -> None:
        """The window could use `target` slots now (it has `in_flight`); `pending` to send."""
        with self._cond:
            notify = False
            if self.concurrency:
                self._target = target
                keep = max(target, in_flight)
                # Give back whole leases the window no longer needs (never one in use).
                while self._leases:
                    spare = self.held - keep
                    fits = [(n, lid) for lid, (n, _) in self._leases.items() if n <= spare]
                    if not fits:
                        break
                    slots, lease_id = max(fits, key=lambda f: f[0])
                    del self._leases[lease_id]
                    self.held -= slots
                    self._release.append(lease_id)
                    notify = True
                if self.held < target:
                    notify = True
            if self.rate:
                self._pending = pending
                if self.credits <= 0 < pending:
                    notify = True
            if notify:
                self._cond.notify()

    def may_send(self, in_flight: int) -> bool:
        """A slot for one more request than `in_flight`, and a rate token."""
        return in_flight < self.held and self.credits > 0

    def sent(self) -> None:
        if self.rate:
            with self._cond:
                self.credits -= 1

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        """Check the limits (LimitError if one is missing) and start taking."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            self.calls += 1
            if self.concurrency:
                limit = read_limit(client, self.concurrency, rate=False)
                if not limit.active:
                    self.held = math.inf  # Prefect's own rule: an inactive limit limits nothing
                    self.concurrency = None
                else:
                    self.block = min(self.block, limit.limit)
            if self.rate:
                self.calls += 1
                limit = read_limit(client, self.rate, rate=True)
                if not limit.active:
                    self.credits = math.inf
                    self.rate = None
                else:
                    self._decay = limit.slot_decay_per_second
                    k = math.ceil(self._decay * RATE_TAKE_S)
                    self._rate_k = max(1, min(limit.limit, k))
        if self.concurrency or self.rate:
            self._thread = threading.Thread(target=self._run, name="flux-limits", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Give every lease back (the thread does it, with its client) and stop."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    # -- the thread's side ----------------------------------------------------------------

    def _due_in(self, now: float) -> float:
        """Seconds until the thread has something to do (0: now). Called with the lock held."""
        if self._stop or self._release:
            return 0.0
        if self.error:
            return 3600.0
        due = 3600.0
        for _, renew_at in self._leases.values():
            due = min(due, renew_at - now)
        if self.concurrency and self.held < self._target:
            due = min(due, self._take_at - now)
        if self.rate and self.credits <= 0 < self._pending:
            due = min(due, self._rate_at - now)
        return max(0.0, due)

    def _run(self) -> None:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                self._serve(client)
        except Exception as exc:  # never leave the loop waiting on a dead thread
            self._fail(f"the shared limits' thread stopped: {type(exc).__name__}: {exc}")

    def _serve(self, client: Any) -> None:
        while True:
            with self._cond:
                while (wait := self._due_in(time.monotonic())) > 0:
                    self._cond.wait(wait)
                release, self._release = self._release, []
                stop = self._stop
                if stop:
                    release += list(self._leases)
                    self._leases.clear()
                    self.held = 0
            for lease_id in release:
                self._give_back(client, lease_id)
            if stop:
                return
            if self.error:
                continue
            try:
                self._renew_due(client)
                self._take_slots(client)
                self._take_tokens(client)
            except LimitError as exc:
                self._fail(str(exc))
            except Exception as exc:
                if not _transient(exc):
                    self._fail(f"{type(exc).__name__}: {exc}")
                    continue
                now = time.monotonic()
                self._failing_since = self._failing_since or now
                if now - self._failing_since > GIVE_UP_S:
                    self._fail(f"the Prefect API failed for {GIVE_UP_S:.0f} s: {exc}")
                    continue
                logger.warning("shared limits: the Prefect API failed (%s); retrying", exc)
                with self._cond:
                    self._take_at = self._rate_at = now + min(10.0, 1.0 + now - self._failing_since)
                    for entry in self._leases.values():
                        entry[1] = max(entry[1], now + 2.0)
            else:
                self._failing_since = None

    def _fail(self, message: str) -> None:
        logger.error("shared limits: %s", message)
        with self._cond:
            self.error = message
        self._wake()

    def _give_back(self, client: Any, lease_id: UUID) -> None:
        self.calls += 1
        try:
            client.release_concurrency_slots_with_lease(lease_id)
        except Exception as exc:  # it expires by itself within the lease
            logger.warning(
                "could not give back a lease of %r (%s): its slots return within %.0f s",
                self.concurrency, exc, self.lease_s,
            )  # fmt: skip

    def _renew_due(self, client: Any) -> None:
        now = time.monotonic()
        with self._cond:
            due = [lid for lid, (_, at) in self._leases.items() if at <= now]
        for lease_id in due:
            self.calls += 1
            try:
                client.renew_concurrency_lease(lease_id, lease_duration=self.lease_s)
            except Exception as exc:
                if _status(exc) in (404, 410):  # expired: those slots are someone else's now
                    with self._cond:
                        lost = self._leases.pop(lease_id, [0])[0]
                        self.held -= lost
                    logger.warning(
                        "a lease of %d slot(s) of %r had expired; taking slots again",
                        lost, self.concurrency,
                    )  # fmt: skip
                    continue
                raise
            with self._cond:
                if lease_id in self._leases:
                    self._leases[lease_id][1] = now + RENEW_FRACTION * self.lease_s

    def _take_slots(self, client: Any) -> None:
        """One block (or what is free) of the concurrency limit, if the window wants more."""
        now = time.monotonic()
        with self._cond:
            if not self.concurrency or self.held >= self._target or now < self._take_at:
                return
            want = min(self.block, self._target - int(self.held))
        granted = self._increment(client, want)
        if granted is None:  # full: read (no write) until someone gives slots back
            self.calls += 1
            limit = read_limit(client, self.concurrency, rate=False)
            self.block = min(self.block, max(1, limit.limit))
            free = limit.limit - limit.active_slots
            if free >= 1:
                granted = self._increment(client, min(want, free, self.block))
            if granted is None:
                with self._cond:
                    self._take_at = time.monotonic() + FULL_POLL_S
                return
        lease_id, slots = granted
        with self._cond:
            if self._stop:
                self._release.append(lease_id)
                return
            self._leases[lease_id] = [slots, time.monotonic() + RENEW_FRACTION * self.lease_s]
            self.held += slots
            self.max_held = max(self.max_held, int(self.held))
        self._wake()

    def _increment(self, client: Any, slots: int) -> tuple[UUID, int] | None:
        """A lease of `slots` slots, or None if the limit has not that many free (423)."""
        from prefect.client.schemas.objects import ConcurrencyLeaseHolder

        holder = (
            ConcurrencyLeaseHolder(type="flow_run", id=UUID(str(self._holder)))
            if self._holder
            else None
        )
        self.calls += 1
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[self.concurrency],
                slots=slots,
                mode="concurrency",
                lease_duration=self.lease_s,
                holder=holder,
            )
        except Exception as exc:
            if _status(exc) == 423:
                return None
            if _status(exc) == 422:  # more than the limit: it was made smaller meanwhile
                return None
            raise
        body = response.json()
        if not body.get("limits"):
            raise LimitError(missing_message(str(self.concurrency), rate=False))
        return UUID(body["lease_id"]), slots

    def _take_tokens(self, client: Any) -> None:
        """`k` tokens of the rate limit once it has room for them (read first, see the top)."""
        now = time.monotonic()
        with self._cond:
            if not self.rate or self.credits > 0 or self._pending <= 0 or now < self._rate_at:
                return
            k = max(1, min(self._rate_k, self._pending))
        self.calls += 1
        limit = read_limit(client, self.rate, rate=True)
        if not limit.active:
            with self._cond:
                self.credits = math.inf
            self._wake()
            return
        self._decay = limit.slot_decay_per_second
        k = min(k, limit.limit)
        short = limit.active_slots + k - limit.limit
        if short > 0:
            with self._cond:
                self._rate_at = time.monotonic() + short / self._decay + RATE_MARGIN_S
            return
        self.calls += 1
        try:
            client.increment_concurrency_slots(names=[self.rate], slots=k, mode="rate_limit")
        except Exception as exc:
            if _status(exc) in (422, 423):  # another holder took the room first
                with self._cond:
                    self._rate_at = time.monotonic() + 1.0 / self._decay
                return
            raise
        with self._cond:
            self.credits += k
        self._wake()


@contextlib.contextmanager
def sharing(
    limits: AccountLimits | None,
    max_concurrency: int,
    wake: Callable[[], None],
    holder: UUID | str | None = None,
) -> Iterator[SharedLimits | None]:
    """The loop's SharedLimits for its life (None without limits); everything given back after."""
    if not limits:
        yield None
        return
    shared = SharedLimits(limits, max_concurrency, wake, holder=holder)
    shared.start()
    try:
        yield shared
    finally:
        shared.close()
