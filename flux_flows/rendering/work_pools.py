"""Chunks as flow runs on a work pool: how a batch leaves one machine for process, Kubernetes or
ECS workers, the way Prefect users already run their flows.

The batch (`chunk_deployment="render-chunk/<deployment>"`) writes each chunk's requests as JSONL
under `runs/<run>/chunks/`, starts one run of the deployment per chunk and waits for them; each
`render-chunk` run renders its chunk on threads in its worker through the same render path and
writes its results beside its requests, which the batch reads back. The destination is the only
thing they share: no result storage, no parameters bigger than a few paths.

Neither side trusts those files, since anyone who can write to the destination can rewrite
them: `chunk_files` checks each requests file's SHA-256 before any spend and each result
against the plan and the destination before the batch records it; the manifest is written
whatever the files say.

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
import functools
import hashlib
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from prefect import flow, get_run_logger

from flux_flows.blocks import FireworksCredentials
from flux_flows.errors import StorageError
from flux_flows.planning import layout
from flux_flows.planning.claims import close_heartbeat
from flux_flows.rendering.chunk_files import (
    NDJSON,
    read_requests,
    read_results,
    results_key,
)
from flux_flows.rendering.limit_settings import AccountLimits
from flux_flows.rendering.one_image import SLOT_LEASE_S, RenderJob, RenderResult
from flux_flows.rendering.pacing import RPM_HEADROOM
from flux_flows.rendering.progress import ProgressReporter
from flux_flows.rendering.spill import SpillFolder
from flux_flows.rendering.window import PlainRunner, render_windowed
from flux_flows.settings import BatchOptions, seconds_from_env
from flux_flows.storage import Storage, open_storage

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from flux_flows.models import ImageRequest
    from flux_flows.planning.plan import PlannedImage

WAIT_FOR_CHUNK_S = 6 * 3600.0
# How many chunks are taken to run at once when the pool's online workers cannot be read.
FALLBACK_PARALLEL = 2
# A chunk run renews `<chunk>.alive` every HEARTBEAT_S seconds (FLUX_FLOWS_CHUNK_HEARTBEAT_S
# overrides it, read by the batch, which passes it on); the batch takes a RUNNING chunk run
# whose heartbeat has not changed for MISSED_BEATS beats for dead.
HEARTBEAT_S = 20.0
MISSED_BEATS = 4


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
    storage: Storage = make_job.keywords["storage"]
    results: dict[str, RenderResult] = {}
    size = max(1, options.chunk_size)
    deployment = options.chunk_deployment or ""
    chunks = -(-len(images) // size)
    share = chunk_share(options.max_concurrency, chunks, online_workers(deployment))
    beat = heartbeat_s()
    shared = _run_parameters(options, make_job, storage, share, beat)
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
                    **shared,
                    "chunk_key": key,
                    # The chunk run renders only the file the batch wrote (see the docstring).
                    "requests_sha256": hashlib.sha256(body).hexdigest(),
                    "in_flight": in_flight,
                }
                active.append((_start_run(deployment, parameters), key, chunk))
            run_id, key, chunk = active.popleft()
            state = _wait_for(run_id, storage, _alive_key(key), beat)
            finished = read_results(storage, key, chunk, state)
            results.update((r.cache_key, r) for r in finished)
            on_results(finished)
            progress.add(sum(1 for r in finished if not r.taken_by))
    return results


def _run_parameters(
    options: BatchOptions,
    make_job: functools.partial[RenderJob],
    storage: Storage,
    share: int,
    beat: float,
) -> dict[str, Any]:
    """What every chunk run of the batch is given: paths, names and its share, never values of
    credentials (blocks travel by name)."""
    rpm = options.requests_per_minute
    return {
        "destination": storage.root_uri,
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


def _start_run(deployment: str, parameters: dict[str, Any]) -> Any:
    """Start one chunk run of `deployment` without waiting for it; its flow run id."""
    from prefect.deployments import run_deployment

    # Called from sync code, so the FlowRun itself rather than a coroutine.
    run = cast(
        "FlowRun",
        run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False),
    )
    return run.id


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


def _alive_key(chunk_key: str) -> str:
    return chunk_key.removesuffix(".jsonl") + ".alive"


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


def _load_blocks(
    credentials_block: str | None, aws_credentials_block: str | None
) -> tuple[FireworksCredentials | None, Any]:
    """The credentials blocks the batch named (they travel by name, never by value)."""
    from prefect.blocks.core import Block

    aws = Block.load(aws_credentials_block) if aws_credentials_block else None
    credentials = (  # a sync load returns the block itself, not a coroutine
        cast(FireworksCredentials, FireworksCredentials.load(credentials_block))
        if credentials_block
        else None
    )
    return credentials, aws


def _render_share(
    requests: list[ImageRequest],
    make_job: functools.partial[RenderJob],
    share: int,
    requests_per_minute: float | None,
    limits: AccountLimits | None,
) -> dict[str, RenderResult]:
    """The chunk rendered on `share` threads at its share of the batch's pace."""
    if requests_per_minute:
        # The slots may come from a chunk that just sent its last request: start one
        # interval after it, as its own pace would have.
        threading.Event().wait(60.0 / (requests_per_minute * RPM_HEADROOM))
    runner = PlainRunner(share)
    try:
        return render_windowed(
            requests,
            lambda request: make_job(request=request),
            max_concurrency=share,
            requests_per_minute=requests_per_minute,
            runner=runner,
            limits=limits,
        )
    finally:
        runner.shutdown()


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
    credentials, aws = _load_blocks(credentials_block, aws_credentials_block)
    storage = open_storage(destination, aws_credentials=aws)
    with _heartbeat(storage, _alive_key(chunk_key), heartbeat_s):
        requests = read_requests(storage, chunk_key, requests_sha256, aws)
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
            try:
                results = _render_share(
                    requests,
                    make_job,
                    share,
                    requests_per_minute,
                    AccountLimits(concurrency_limit, rate_limit) or None,
                )
            finally:
                if run_id:
                    close_heartbeat(storage, run_id)
        body = b"".join(r.to_json() + b"\n" for r in results.values())
        storage.put(results_key(chunk_key), body, content_type=NDJSON)
    get_run_logger().info("chunk %s: %d images rendered", chunk_key, len(results))
    return len(results)
