"""Images another live run was generating when this run came to them: wait, then find or take.

A run renders everything it can first; an image whose lease another live process held comes
back as a `taken_by` result (see `claims`). Here the run waits for those images only (never for
images the other run merely planned: a lease is held only while its image is in flight), and
as each one settles it is either found stored (recorded as cached, not paid) or, its holder
having released it or gone silent for a lease, rendered here. The wait says what it waits for
and since when, and one Ctrl-C ends it with the rest recorded as not attempted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from flux_flows.models import FinishReason
from flux_flows.planning import claims
from flux_flows.planning.plan import BatchPlan, PlannedImage, StoredImage
from flux_flows.rendering.interrupts import first_ctrl_c_stops
from flux_flows.rendering.one_image import RenderResult, found_stored
from flux_flows.rendering.progress import ProgressReporter, say_status
from flux_flows.rendering.window import INTERRUPTED
from flux_flows.storage import Storage

logger = logging.getLogger("flux_flows.rendering.overlap")

RenderAgain = Callable[[Sequence[PlannedImage]], dict[str, RenderResult]]
POLL_S = 1.0
LOG_EVERY_S = 30.0


def _waiting_line(taken: dict[str, str], since: float) -> str:
    holders = sorted(set(taken.values()))
    who = holders[0] if len(holders) == 1 else f"{len(holders)} other runs"
    at = datetime.fromtimestamp(since, UTC).strftime("%H:%M:%S UTC")
    return (
        f"waiting for {len(taken)} image(s) that {who} is generating into this destination "
        f"(since {at}; Ctrl-C stops waiting and writes the manifest)"
    )


def settle_taken(
    plan: BatchPlan,
    storage: Storage,
    run_id: str,
    results: dict[str, RenderResult],
    render_again: RenderAgain,
    progress: ProgressReporter,
    *,
    poll_s: float = POLL_S,
) -> dict[str, RenderResult]:
    """Resolve every `taken_by` result: found stored (moved into `plan.stored`), rendered here
    once its holder lets go, or, after a Ctrl-C, an ERROR saying it was not attempted.

    Each round looks at every waited-for image once, then pauses `poll_s` (a Ctrl-C ends the
    pause), so an image that keeps coming back taken costs one look a second, not a busy loop.
    """
    interrupted = any(r.error == INTERRUPTED for r in results.values())
    since = time.time()
    last_log = 0.0
    first = True
    with first_ctrl_c_stops() as pressed:
        while taken := {k: r.taken_by for k, r in results.items() if r.taken_by}:
            if not first:
                pressed.wait(poll_s)
            first = False
            if interrupted or pressed.is_set():
                for key in taken:
                    results[key] = RenderResult(
                        cache_key=key, finish_reason=FinishReason.ERROR, error=INTERRUPTED
                    )
                logger.warning("interrupted while waiting for another run: manifest next")
                break
            line = _waiting_line({k: v or "" for k, v in taken.items()}, since)
            say_status(line)
            if time.monotonic() - last_log >= LOG_EVERY_S:
                logger.info("%s", line)
                last_log = time.monotonic()
            free = _settle_once(plan, storage, run_id, results, taken)
            progress.add(sum(1 for key in taken if key not in results))  # found stored
            if free:
                say_status("")
                again = render_again([plan.unique[key] for key in free])
                # A Ctrl-C during that pass stopped it: stop waiting for the rest too.
                interrupted = any(r.error == INTERRUPTED for r in again.values())
                results |= again
    say_status("")
    return results


def _settle_once(
    plan: BatchPlan,
    storage: Storage,
    run_id: str,
    results: dict[str, RenderResult],
    taken: Mapping[str, str | None],
) -> list[str]:
    """One look at each waited-for image: stored ones become cached, free ones are returned."""
    free: list[str] = []
    for key in taken:
        found = found_stored(storage, plan.unique[key].request, key)
        if found is not None and found.object_key:
            plan.stored[key] = StoredImage(found.object_key, found.finish_reason)
            del results[key]
        elif claims.is_taken(storage, run_id, key) is None:
            free.append(key)
    return free
