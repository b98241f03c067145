"""The user's account-wide limit settings, read and checked before anything is sent.

`AccountLimits` names the Prefect global concurrency limits a batch shares with every other run
(`concurrency_limit`, `rate_limit`; held by `limits.SharedLimits`). `read_limit` reads one and
says how to create or fix it; `check_rate_limit` is the preflight's check, before any spend.

In any window of T seconds a rate limit of burst B and decay d grants at most B + d*T tokens,
and a batch spends a token within moments of taking it (it takes more only once it has none
left). So `prefect gcl create fireworks-rpm --limit B --slot-decay-per-second d` with
B + 60*d <= the account's requests per minute keeps every run and worker together under it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flux_flows.settings import seconds_from_env

logger = logging.getLogger("flux_flows.rendering.limits")

# How long slots taken from a concurrency limit outlive a holder that stopped renewing them
# (renewed every limits.RENEW_FRACTION of it while held). The Prefect server refuses shorter
# leases.
SLOT_LEASE_S = 60.0
MIN_LEASE_S = 60.0
LEASE_ENV = "FLUX_FLOWS_SLOT_LEASE_S"


def lease_s() -> float:
    """Seconds a block's lease lasts: FLUX_FLOWS_SLOT_LEASE_S, else SLOT_LEASE_S (>= 60)."""
    return seconds_from_env(LEASE_ENV, SLOT_LEASE_S, minimum=MIN_LEASE_S)


@dataclass(frozen=True)
class AccountLimits:
    """The names of the user's shared limits; picklable, so it travels with a chunk."""

    concurrency_limit: str | None = None
    rate_limit: str | None = None

    def __bool__(self) -> bool:
        return bool(self.concurrency_limit or self.rate_limit)


class LimitError(RuntimeError):
    """A shared limit is missing, or cannot be used as asked: nothing more is sent."""


def missing_message(name: str, rate: bool) -> str:
    """What to tell a user whose limit does not exist: the command that creates it."""
    if rate:
        return (
            f"rate_limit={name!r}: no Prefect global concurrency limit has this name; create it "
            f"with `prefect gcl create {name} --limit 10 --slot-decay-per-second 9` "
            "(a burst of 10, 540 requests a minute; keep limit + 60 x decay <= your account's "
            "requests per minute)"
        )
    return (
        f"concurrency_limit={name!r}: no Prefect global concurrency limit has this name; "
        f"create it with `prefect gcl create {name} --limit 8`"
    )


def read_limit(client: Any, name: str, *, rate: bool) -> Any:
    """The limit (its `active_slots` after decay), or LimitError saying how to create it."""
    from prefect.exceptions import ObjectNotFound

    try:
        limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        raise LimitError(missing_message(name, rate)) from None
    if rate and limit.active and limit.slot_decay_per_second <= 0:
        raise LimitError(
            f"rate_limit={name!r} has no slot decay, so it is not a rate limit: "
            f"`prefect gcl update {name} --slot-decay-per-second N` (requests a second)"
        )
    if limit.active and limit.limit < 1:
        raise LimitError(f"global concurrency limit {name!r} has a limit of {limit.limit}")
    return limit


def check_rate_limit(name: str) -> None:
    """Preflight: the rate limit exists and decays (LimitError turned into ValueError)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            limit = read_limit(client, name, rate=True)
        except LimitError as exc:
            raise ValueError(f"{exc} (nothing was generated)") from None
    if not limit.active:
        logger.warning("global concurrency limit %r is inactive: it limits no request", name)
