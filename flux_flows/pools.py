"""Chunks as flow runs on a work pool: how a batch leaves one machine for process, Kubernetes or
ECS workers, the way Prefect users already run their flows.

The batch (`chunk_deployment="render-chunk/<deployment>"`) writes each chunk's requests as JSONL
under `runs/<run>/chunks/`, starts one run of the deployment per chunk and waits for them; each
`render-chunk` run renders its chunk on threads in its worker through the same render path and
writes its results beside its requests, which the batch reads back. The destination is the only
thing they share: no result storage, no parameters bigger than a few paths.

Neither side trusts those files, since anyone who can write to the destination can rewrite them:
- the batch sends the SHA-256 of each requests file it wrote as the run's `requests_sha256`; the
  chunk run checks it before any spend and refuses a file that differs (`ChunkFileChanged`: the
  run ends Failed and the batch records the chunk's images as ERROR, with that reason);
- the batch accepts a result only for an image planned in that chunk (others are dropped with a
  warning), and a SUCCESS or CONTENT_FILTERED one only if it names the object the plan expects
  and that object exists now; anything else, and any planned image without a result, becomes an
  ERROR record saying why (an unverified result keeps the API calls it reports spent). The
  results file is read up to a size bounded by the chunk's length; a file that is too big or not
  made of render results makes the whole chunk ERROR. The batch's manifest is written anyway.

The batch's limits hold across all the workers, at no cost per image: the batch creates a
Prefect global concurrency limit of `max_concurrency` slots for itself before any spend (and
deletes it at the end); each chunk run takes its *share* of it once, for its whole life, and
renders with `share` threads, pacing itself in-process at `share / max_concurrency` of
`requests_per_minute`. At most `max_concurrency / share` chunks hold slots at once, so the
whole batch stays under both limits however the chunks land on the workers. (A slot per image
costs a round trip to the Prefect server each: ~10 images/s at most, measured in
benchmarks/RESULTS.md.) The user's own account-wide `concurrency_limit` and `rate_limit`, shared
with other flows, are held the same way as by any batch (`limits`): each chunk run takes leased
blocks of slots and batches of rate tokens as its window needs them, for its whole life.

A chunk run whose machine dies stays RUNNING in Prefect (an OSS server detects no "zombie" runs
by itself), so each chunk run writes a heartbeat beside its chunk (`<chunk>.alive`, every
`HEARTBEAT_S`); the batch marks a RUNNING chunk run whose heartbeat has not changed for
`MISSED_BEATS` beats Crashed and records its images as ERROR. Credentials travel by block name
only, never as values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.exceptions import MissingContextError

from flux_flows import layout
from flux_flows.blocks import FireworksCredentials
from flux_flows.claims import close_heartbeat
from flux_flows.errors import StorageError
from flux_flows.limits import AccountLimits
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.pacing import RPM_HEADROOM
from flux_flows.progress import ProgressReporter
from flux_flows.render import SLOT_LEASE_S, RenderJob, RenderResult
from flux_flows.settings import BatchOptions, seconds_from_env
from flux_flows.spill import SpillFolder
from flux_flows.storage import Storage, TooLargeError, iter_uri_lines, open_storage

if TYPE_CHECKING:
    from flux_flows.batch import PlannedImage

logger = logging.getLogger("flux_flows.pools")

NDJSON = "application/x-ndjson"
WAIT_FOR_CHUNK_S = 6 * 3600.0
# How many chunks are taken to run at once when the pool's online workers cannot be read.
FALLBACK_PARALLEL = 2
# A chunk run renews `<chunk>.alive` every HEARTBEAT_S seconds (FLUX_FLOWS_CHUNK_HEARTBEAT_S
# overrides it, read by the batch, which passes it on); the batch takes a RUNNING chunk run
# whose heartbeat has not changed for MISSED_BEATS beats for dead.
HEARTBEAT_S = 20.0
MISSED_BEATS = 4
# A chunk's results file is read whole, up to this much per planned image (one result line is
# ~0.5 KB; its error text a few KB at most) plus RESULTS_SLACK_BYTES: a bigger one is not a
# chunk run's and its images are ERROR records.
RESULT_LINE_MAX_BYTES = 16 * 1024
RESULTS_SLACK_BYTES = 64 * 1024
# How many dropped cache keys a warning names (the count is always given).
NAMED_IN_WARNING = 5
# HEADs at once when the batch checks that a chunk's stored images exist.
EXISTS_CHECKS_AT_ONCE = 8


class ChunkFileChanged(RuntimeError):
    """A chunk run's requests file is not the one its batch wrote: nothing is rendered."""


def _log() -> Any:
    """The flow run's logger inside a flow run, the module's outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def heartbeat_s() -> float:
    """Seconds between a chunk run's heartbeats: FLUX_FLOWS_CHUNK_HEARTBEAT_S, else HEARTBEAT_S."""
    return seconds_from_env("FLUX_FLOWS_CHUNK_HEARTBEAT_S", HEARTBEAT_S)


def _block_name(block: Any) -> str | None:
    """ "slug/name" of a saved block; an unsaved one must not travel (its secret would be shown
    in the run's parameters), so the worker's own configuration is used instead."""
    name = getattr(block, "_block_document_name", None) if block is not None else None
    return f"{block.get_block_type_slug()}/{name}" if name else None


@contextlib.contextmanager
def batch_limits(options: BatchOptions, batch_id: str) -> Iterator[str]:
    """The batch's own in-flight limit (a Prefect global concurrency limit of `max_concurrency`
    slots), created before any spend, deleted after."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    in_flight = f"flux-flows-{batch_id}-in-flight"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=in_flight, limit=options.max_concurrency)
        )
    try:
        yield in_flight
    finally:
        with get_client(sync_client=True) as client, contextlib.suppress(Exception):
            client.delete_global_concurrency_limit_by_name(in_flight)


def online_workers(deployment: str) -> int | None:
    """How many workers of the deployment's work pool are ONLINE now (None: unknown)."""
    from prefect.client.orchestration import get_client

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name
        if pool:
            workers = client.read_workers_for_work_pool(pool)
            return sum(1 for w in workers if w.status and w.status.value == "ONLINE")
    return None


def chunk_share(max_concurrency: int, chunks: int, online: int | None) -> int:
    """Each chunk run's share of the batch's in-flight limit (its threads and slots).

    `parallel`, how many chunks should run at once, is the number of ONLINE workers of the
    pool when the batch starts (FALLBACK_PARALLEL if unknown or none), never more than the
    chunks; each gets `max_concurrency // parallel` (at least 1), so the batch spreads over
    that many workers instead of the first chunk taking every slot. Workers that come online
    later take chunks too, as slots free up.
    """
    parallel = max(1, min(chunks, online or FALLBACK_PARALLEL))
    return max(1, max_concurrency // parallel)


def _batch_id(work_dir: str) -> str:
    """Unique per batch (and per `again/` pass): a readable hint of the run plus a hash."""
    parts = [p for p in work_dir.split("/") if p and p != layout.RUNS.strip("/")]
    digest = hashlib.sha1(work_dir.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"{layout.slug(parts[0] if parts else 'batch', 28)}-{digest}"


def render_on_pool(
    images: Sequence[PlannedImage],
    options: BatchOptions,
    progress: ProgressReporter,
    make_job: functools.partial[RenderJob],
    on_results: Callable[[list[RenderResult]], None],
    work_dir: str,
) -> dict[str, RenderResult]:
    """Send the chunks as runs of `options.chunk_deployment`; gather their results.

    At most two runs per share of the window exist at once (one rendering, one starting up
    behind it); the next chunk's run is started as one ends, oldest first.
    """
    from prefect.deployments import run_deployment

    storage: Storage = make_job.keywords["storage"]
    results: dict[str, RenderResult] = {}
    size = max(1, options.chunk_size)
    deployment = options.chunk_deployment or ""
    chunks = -(-len(images) // size)
    share = chunk_share(options.max_concurrency, chunks, online_workers(deployment))
    rpm = options.requests_per_minute
    beat = heartbeat_s()
    # Only the runs that can render now, plus one starting up behind each, exist at a time: a
    # run started early would sit in a process of its own polling the server for slots.
    window = 2 * max(1, options.max_concurrency // share)
    pending = deque(enumerate(range(0, len(images), size), start=1))
    active: deque[tuple[Any, str, Sequence[PlannedImage]]] = deque()
    with batch_limits(options, _batch_id(work_dir)) as in_flight:
        while pending or active:
            while pending and len(active) < window:
                number, start = pending.popleft()
                chunk = images[start : start + size]
                key = f"{work_dir}chunk-{number:05d}.jsonl"
                body = b"".join(p.request.model_dump_json().encode() + b"\n" for p in chunk)
                storage.put(key, body, content_type=NDJSON)
                parameters = {
                    "destination": storage.root_uri,
                    "chunk_key": key,
                    # The chunk run renders only the file the batch wrote (see the docstring).
                    "requests_sha256": hashlib.sha256(body).hexdigest(),
                    "in_flight": in_flight,
                    "share": share,
                    "requests_per_minute": rpm * share / options.max_concurrency if rpm else None,
                    "heartbeat_s": beat,
                    "concurrency_limit": options.concurrency_limit,
                    "rate_limit": options.rate_limit,
                    "thumbnails": options.thumbnails,
                    "credentials_block": _block_name(options.credentials),
                    "aws_credentials_block": _block_name(options.aws_credentials),
                    "parent_flow_run_id": make_job.keywords.get("flow_run_id"),
                    "run_id": make_job.keywords.get("run_id"),
                }
                run = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False)
                active.append((run.id, key, chunk))
            run_id, key, chunk = active.popleft()
            state = _wait_for(run_id, storage, _alive_key(key), beat)
            finished = _read_results(storage, key, chunk, state)
            results.update((r.cache_key, r) for r in finished)
            on_results(finished)
            progress.add(sum(1 for r in finished if not r.taken_by))
    return results


def _wait_for(flow_run_id: Any, storage: Storage, alive_key: str, beat_s: float) -> Any:
    """The chunk run's final state (Completed, Failed, Crashed...), or its state at the deadline.

    A run that is RUNNING but whose heartbeat has not changed for MISSED_BEATS beats (measured
    on this process's clock from when it was first seen RUNNING, so no two clocks are compared)
    has lost its machine or process: it is set Crashed, and its state returned.
    """
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + WAIT_FOR_CHUNK_S
    dead_after = MISSED_BEATS * beat_s
    pause = threading.Event()
    last_beat: bytes | None = None
    quiet_since: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            now = time.monotonic()
            if (state is not None and state.is_final()) or now > deadline:
                return state
            if state is not None and state.is_running():
                beat = _read_beat(storage, alive_key)
                if quiet_since is None or beat != last_beat:
                    last_beat, quiet_since = beat, now
                elif now - quiet_since > dead_after:
                    return _crash(client, flow_run_id, dead_after)
            else:
                quiet_since = None  # not started yet (or paused): no heartbeat is due
            pause.wait(min(1.0, beat_s / 4))


def _read_beat(storage: Storage, key: str) -> bytes | None:
    try:
        return storage.get(key)
    except (StorageError, OSError):
        return None


def _crash(client: Any, flow_run_id: Any, dead_after: float) -> Any:
    """Mark a chunk run whose heartbeat stopped Crashed (forced: it is RUNNING, and nothing else
    will end it); its images become ERROR records of the batch."""
    from prefect.states import Crashed

    message = (
        f"the chunk's worker stopped answering: no heartbeat for {dead_after:.0f} s (its machine "
        "or flow-run process died); the batch records its images as ERROR and a re-run does them"
    )
    with contextlib.suppress(Exception):  # outside a flow run there is no run logger
        get_run_logger().warning("chunk run %s: %s", flow_run_id, message)
    client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    return client.read_flow_run(flow_run_id).state


def _results_key(chunk_key: str) -> str:
    return chunk_key.removesuffix(".jsonl") + ".results.jsonl"


def _alive_key(chunk_key: str) -> str:
    return chunk_key.removesuffix(".jsonl") + ".alive"


def _read_results(
    storage: Storage, chunk_key: str, chunk: Sequence[PlannedImage], state: Any
) -> list[RenderResult]:
    """One result per image planned in the chunk, each checked against the plan and the
    destination (see the module's docstring); never raises for what the file says.

    If the run died without writing its results (or they are not a chunk run's), its images are
    ERROR records: what it stored before dying is found by the next run's listing, never paid
    twice.
    """
    planned = {p.cache_key: p for p in chunk}
    key = _results_key(chunk_key)
    where = storage.uri_for(key)
    limit = RESULTS_SLACK_BYTES + RESULT_LINE_MAX_BYTES * len(planned)
    ended = _ended(state)
    try:
        body = storage.get(key, max_bytes=limit)
        reported = [_result_of_line(line) for line in body.splitlines() if line.strip()]
    except TooLargeError as exc:
        error = (
            f"the chunk's results file {where} is {exc.size} bytes, over the {limit} that "
            f"{len(planned)} results can take: not read; its flow run ended {ended}"
        )
        return _all_failed(planned, error)
    except (StorageError, OSError):
        name, why = _ended_parts(state)
        return _all_failed(planned, f"the chunk's flow run ended {name} without results{why}")
    except (ValueError, RecursionError) as exc:
        error = (
            f"the chunk's results file {where} is not a chunk run's ({exc}); its flow run "
            f"ended {ended}"
        )
        return _all_failed(planned, error)
    accepted: dict[str, RenderResult] = {}
    unplanned: list[str] = []
    repeated = 0
    for result in reported:
        if result.cache_key not in planned:
            unplanned.append(result.cache_key)
        elif result.cache_key in accepted:
            repeated += 1
        else:
            accepted[result.cache_key] = result
    if unplanned:
        named = ", ".join(repr(k[:40]) for k in unplanned[:NAMED_IN_WARNING])
        more = (
            f" and {len(unplanned) - NAMED_IN_WARNING} more"
            if len(unplanned) > NAMED_IN_WARNING
            else ""
        )
        _log().warning(
            "%s: dropped %d result(s) for images this chunk did not plan (%s%s)",
            where, len(unplanned), named, more,
        )  # fmt: skip
    if repeated:
        _log().warning(
            "%s: dropped %d repeated result(s), kept each image's first", where, repeated
        )
    checked = _verify(storage, planned, accepted, where)
    missing = f"the chunk's results file {where} has no result for it; its flow run ended {ended}"
    return [checked.get(k) or _failed(k, missing) for k in planned]


def _ended_parts(state: Any) -> tuple[str, str]:
    """(the chunk run's final state's name, ": the reason Prefect gives" or "" if it completed)."""
    name = getattr(state, "name", None) or "unknown"
    message = getattr(state, "message", None)
    return name, f": {message}" if message and name != "Completed" else ""


def _ended(state: Any) -> str:
    """How the chunk run ended, with the reason Prefect gives when it did not complete."""
    return "".join(_ended_parts(state))


def _failed(cache_key: str, error: str) -> RenderResult:
    return RenderResult(cache_key=cache_key, finish_reason=FinishReason.ERROR, error=error)


def _all_failed(planned: dict[str, PlannedImage], error: str) -> list[RenderResult]:
    _log().warning("%s", error)
    return [_failed(k, error) for k in planned]


def _unverified(result: RenderResult, error: str) -> RenderResult:
    """ERROR, saying why; the API calls it reports stay (they were spent), the object goes."""
    return dataclasses.replace(
        result,
        finish_reason=FinishReason.ERROR,
        object_key=None,
        thumbnail=False,
        already_stored=False,
        recovered_from_spill=False,
        taken_by=None,
        error=error,
    )


def _verify(
    storage: Storage,
    planned: dict[str, PlannedImage],
    reported: dict[str, RenderResult],
    where: str,
) -> dict[str, RenderResult]:
    """Each reported result as the batch can vouch for it: a SUCCESS or CONTENT_FILTERED only
    at the object the plan expects, found in the destination now (one HEAD each, a few at
    once); anything else ERROR, saying why."""
    checked: dict[str, RenderResult] = {}
    refused = 0

    def refuse(cache_key: str, result: RenderResult, error: str) -> None:
        nonlocal refused
        refused += 1
        checked[cache_key] = _unverified(result, error)

    to_check: dict[str, str] = {}  # cache key -> the object the plan expects
    for cache_key, result in reported.items():
        said = result.finish_reason
        if said is FinishReason.ERROR:
            error = result.error or f"the chunk's results file {where} says ERROR, without why"
            checked[cache_key] = dataclasses.replace(
                result, object_key=None, thumbnail=False, error=error
            )
        elif said not in (FinishReason.SUCCESS, FinishReason.CONTENT_FILTERED):
            error = (
                f"the chunk's results file {where} says {said.value}, which no chunk run reports"
            )
            refuse(cache_key, result, error)
        elif result.object_key is None:
            kept = f" (kept on its worker at {result.spill_path})" if result.spill_path else ""
            error = (
                f"the chunk's results file says {said.value}{kept} but names no object in the "
                f"destination{f': {result.error}' if result.error else ''}"
            )
            refuse(cache_key, result, error)
        else:
            expected = layout.image_key(planned[cache_key].request, said)
            if result.object_key == expected:
                to_check[cache_key] = expected
            else:
                error = (
                    f"the chunk's results file says {said.value} at {result.object_key[:200]!r}, "
                    f"not at {storage.uri_for(expected)} where the plan puts it"
                )
                refuse(cache_key, result, error)
    found: dict[str, bool | str] = {}
    if to_check:
        with ThreadPoolExecutor(min(EXISTS_CHECKS_AT_ONCE, len(to_check))) as pool:
            found = dict(zip(to_check, pool.map(_exists(storage), to_check.values()), strict=True))
    for cache_key, expected in to_check.items():
        result, there = reported[cache_key], found[cache_key]
        said, uri = result.finish_reason.value, storage.uri_for(expected)
        if there is True:
            checked[cache_key] = result
        elif there is False:
            refuse(
                cache_key, result, f"the chunk's results file says {said} but {uri} does not exist"
            )
        else:
            error = f"the chunk's results file says {said} but {uri} could not be checked ({there})"
            refuse(cache_key, result, error)
    if refused:
        _log().warning("%s: %d result(s) not verified, recorded as ERROR", where, refused)
    return checked


def _exists(storage: Storage) -> Callable[[str], bool | str]:
    """storage.exists, or why it could not tell."""

    def exists(key: str) -> bool | str:
        try:
            return storage.exists(key)
        except (StorageError, OSError) as exc:
            return str(exc) or type(exc).__name__

    return exists


def _annotation_types(annotation: str) -> tuple[type, ...] | None:
    """The types a RenderResult field's (string) annotation allows; None: not checked."""
    known: dict[str, tuple[type, ...]] = {
        "str": (str,),
        "int": (int,),
        "bool": (bool,),
        "float": (int, float),
        "None": (type(None),),
        "FinishReason": (FinishReason,),
    }
    allowed: list[type] = []
    for part in str(annotation).split("|"):
        types = known.get(part.strip())
        if types is None:
            return None
        allowed.extend(types)
    return tuple(allowed)


# from_json checks a line's field names, not their values' types: what each may hold.
_RESULT_TYPES = {
    f.name: types
    for f in dataclasses.fields(RenderResult)
    if (types := _annotation_types(str(f.type))) is not None
}


def _result_of_line(line: bytes) -> RenderResult:
    """One line of a results file; ValueError unless each field holds what a chunk run writes
    (a string where a string goes, counts that are whole and not negative, finite numbers)."""
    result = RenderResult.from_json(line)
    for name, types in _RESULT_TYPES.items():
        value = getattr(result, name)
        wrong = not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        if isinstance(value, int | float) and not isinstance(value, bool):
            wrong = wrong or value < 0 or not math.isfinite(value)
        if wrong:
            raise ValueError(f"{name} is {str(value)[:40]!r} in {line[:200]!r}")
    return result


def _read_requests(
    storage: Storage, chunk_key: str, expected_sha256: str | None, aws: Any
) -> list[ImageRequest]:
    """The chunk's requests, once its file is known to be the one the batch wrote.

    The file is read twice, as a stream: first only hashed (a file swapped for a huge one is
    refused without being held), then hashed again while parsed (one changed in between is
    refused too). Raises ChunkFileChanged, naming the chunk.
    """
    uri = storage.uri_for(chunk_key)

    def lines() -> Iterator[bytes]:
        return iter_uri_lines(uri, aws_credentials=aws, keepends=True)

    def check(digest: Any, again: bool) -> None:
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256.lower():
            how = "it changed while being read:" if again else "its"
            raise ChunkFileChanged(
                f"chunk {chunk_key}: its requests file {uri} is not the one the batch wrote "
                f"({how} SHA-256 is {digest.hexdigest()}, the batch's {expected_sha256}): "
                "refused, nothing was rendered or paid for"
            )

    if expected_sha256 is None:
        _log().warning(
            "chunk %s: no requests_sha256 given, its requests file is not checked", chunk_key
        )
    else:
        first = hashlib.sha256()
        for line in lines():
            first.update(line)
        check(first, again=False)
    digest = hashlib.sha256()
    requests = []
    for line in lines():
        digest.update(line)
        if line.strip():
            requests.append(ImageRequest.model_validate_json(line))
    check(digest, again=True)
    return requests


@contextlib.contextmanager
def _heartbeat(storage: Storage, key: str, every_s: float) -> Iterator[None]:
    """Write `key` now and every `every_s` seconds from a daemon thread (each beat differs: a
    counter), so the batch can tell this run is alive; removed at the end."""
    stop = threading.Event()
    host, pid = socket.gethostname(), os.getpid()

    def beat(number: int) -> None:
        body = json.dumps({"beat": number, "at": time.time(), "host": host, "pid": pid})
        with contextlib.suppress(StorageError, OSError):
            storage.put(key, body.encode(), content_type="application/json")

    def renew() -> None:
        number = 1
        while not stop.wait(every_s):
            number += 1
            beat(number)

    beat(1)
    thread = threading.Thread(target=renew, name="flux-chunk-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        with contextlib.suppress(StorageError, OSError):
            storage.delete(key)


@contextlib.contextmanager
def _holding(in_flight: str | None, share: int) -> Iterator[None]:
    """`share` slots of the batch's in-flight limit, taken once and held (Prefect renews the
    lease) until the chunk is rendered; a killed run's slots come back after SLOT_LEASE_S."""
    if not in_flight:
        yield
        return
    from prefect.concurrency.sync import concurrency

    # strict: a missing limit must not mean "no limit". A failed lease renewal only warns:
    # cancelling would lose the images being paid for.
    with concurrency(
        in_flight,
        occupy=share,
        strict=True,
        lease_duration=SLOT_LEASE_S,
        raise_on_lease_renewal_failure=False,
    ):
        yield


@flow(name="render-chunk", persist_result=False, log_prints=True)
def render_chunk(
    destination: str,
    chunk_key: str,
    *,
    in_flight: str | None = None,
    share: int = 8,
    requests_per_minute: float | None = None,
    heartbeat_s: float = HEARTBEAT_S,
    concurrency_limit: str | None = None,
    rate_limit: str | None = None,
    thumbnails: bool = True,
    credentials_block: str | None = None,
    aws_credentials_block: str | None = None,
    parent_flow_run_id: str | None = None,
    run_id: str | None = None,
    requests_sha256: str | None = None,
) -> int:
    """Render one chunk of a batch on this worker; started by the batch, not by hand.

    Reads `<destination>/<chunk_key>` (one request a line) and, before any spend, checks that
    its SHA-256 is `requests_sha256`, the batch's own (None, from a batch older than the check:
    not checked); a file that differs is refused (`ChunkFileChanged`), the run ends Failed and
    nothing is paid. Then it holds `share` slots of the batch's `in_flight` limit while it
    renders on `share` threads at `requests_per_minute` (its share of the batch's pace), holding
    blocks of the user's `concurrency_limit` and tokens of its `rate_limit` as its window needs
    them (`limits`); beats `<chunk>.alive` every
    `heartbeat_s`; writes `<chunk>.results.jsonl` beside it. Returns how many it rendered.
    """
    from prefect.blocks.core import Block

    from flux_flows.dispatch import _PlainRunner, render_windowed

    aws = Block.load(aws_credentials_block) if aws_credentials_block else None
    credentials = FireworksCredentials.load(credentials_block) if credentials_block else None
    storage = open_storage(destination, aws_credentials=aws)
    with _heartbeat(storage, _alive_key(chunk_key), heartbeat_s):
        requests = _read_requests(storage, chunk_key, requests_sha256, aws)
        make_job = functools.partial(
            RenderJob,
            storage=storage,
            spill=SpillFolder(storage.root_uri),
            credentials=credentials,
            aws_credentials=aws,
            flow_run_id=parent_flow_run_id,
            concurrency_limit=concurrency_limit,
            thumbnails=thumbnails,
            run_id=run_id,
        )
        with _holding(in_flight, share):
            if requests_per_minute:
                # The slots may come from a chunk that just sent its last request: start one
                # interval after it, as its own pace would have.
                threading.Event().wait(60.0 / (requests_per_minute * RPM_HEADROOM))
            runner = _PlainRunner(share)
            try:
                results = render_windowed(
                    requests,
                    lambda request: make_job(request=request),
                    max_concurrency=share,
                    requests_per_minute=requests_per_minute,
                    runner=runner,
                    limits=AccountLimits(concurrency_limit, rate_limit) or None,
                )
            finally:
                runner.shutdown()
                if run_id:
                    close_heartbeat(storage, run_id)
        body = b"".join(r.to_json() + b"\n" for r in results.values())
        storage.put(_results_key(chunk_key), body, content_type=NDJSON)
    get_run_logger().info("chunk %s: %d images rendered", chunk_key, len(results))
    return len(results)
