"""Chunks as flow runs on a work pool: how a batch leaves one machine for process, Kubernetes or
ECS workers, the way Prefect users already run their flows.

The batch (`chunk_deployment="render-chunk/<deployment>"`) writes each chunk's requests as JSONL
under `runs/<run>/chunks/`, starts one run of the deployment per chunk and waits for them; each
`render-chunk` run renders its chunk on threads in its worker through the same render path and
writes its results beside its requests, which the batch reads back. The destination is the only
thing they share: no result storage, no parameters bigger than a few paths.

The batch's limits hold across all the workers: the batch creates two Prefect global
concurrency limits for itself (in flight: `max_concurrency`; pace: `requests_per_minute`, as a
slot decay for `rate_limit`) before any spend, every image takes a slot of each, and the batch
deletes them at the end. Credentials travel by block name only, never as values.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger

from flux_flows import layout
from flux_flows.blocks import FireworksCredentials
from flux_flows.errors import StorageError
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.progress import ProgressReporter
from flux_flows.render import RenderJob, RenderResult
from flux_flows.settings import BatchOptions
from flux_flows.spill import SpillFolder
from flux_flows.storage import Storage, iter_uri_lines, open_storage

if TYPE_CHECKING:
    from flux_flows.batch import PlannedImage

NDJSON = "application/x-ndjson"
WAIT_FOR_CHUNK_S = 6 * 3600.0


def _block_name(block: Any) -> str | None:
    """ "slug/name" of a saved block; an unsaved one must not travel (its secret would be shown
    in the run's parameters), so the worker's own configuration is used instead."""
    name = getattr(block, "_block_document_name", None) if block is not None else None
    return f"{block.get_block_type_slug()}/{name}" if name else None


@contextlib.contextmanager
def batch_limits(options: BatchOptions, batch_id: str) -> Iterator[tuple[str, str | None]]:
    """The batch's own global concurrency limits, created before any spend, deleted after."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    in_flight = f"flux-flows-{batch_id}-in-flight"
    pace = f"flux-flows-{batch_id}-pace" if options.requests_per_minute else None
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=in_flight, limit=options.max_concurrency)
        )
        if pace and options.requests_per_minute:
            per_second = options.requests_per_minute / 60.0
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name=pace, limit=max(1, math.ceil(per_second)), slot_decay_per_second=per_second
                )
            )
    try:
        yield in_flight, pace
    finally:
        with get_client(sync_client=True) as client:
            for name in (in_flight, pace):
                if name:
                    with contextlib.suppress(Exception):
                        client.delete_global_concurrency_limit_by_name(name)


def render_on_pool(
    images: Sequence[PlannedImage],
    options: BatchOptions,
    progress: ProgressReporter,
    make_job: functools.partial[RenderJob],
    on_results: Callable[[list[RenderResult]], None],
    work_dir: str,
) -> dict[str, RenderResult]:
    """Send the chunks as runs of `options.chunk_deployment`; gather their results."""
    from prefect.deployments import run_deployment

    storage: Storage = make_job.keywords["storage"]
    batch_id = layout.slug(work_dir.rstrip("/").rsplit("/", 1)[-1], 40)
    results: dict[str, RenderResult] = {}
    size = max(1, options.chunk_size)
    with batch_limits(options, batch_id) as (in_flight, pace):
        started = []
        for number, start in enumerate(range(0, len(images), size), start=1):
            chunk = images[start : start + size]
            key = f"{work_dir}chunk-{number:05d}.jsonl"
            storage.put(
                key,
                b"".join(p.request.model_dump_json().encode() + b"\n" for p in chunk),
                content_type=NDJSON,
            )
            parameters = {
                "destination": storage.root_uri,
                "chunk_key": key,
                "max_concurrency": options.max_concurrency,
                "concurrency_limit": in_flight,
                "rate_limit": pace,
                "account_limit": options.concurrency_limit,
                "credentials_block": _block_name(options.credentials),
                "aws_credentials_block": _block_name(options.aws_credentials),
                "parent_flow_run_id": make_job.keywords.get("flow_run_id"),
            }
            run = run_deployment(
                options.chunk_deployment or "", parameters=parameters, timeout=0, as_subflow=False
            )
            started.append((run.id, key, chunk))
        for run_id, key, chunk in started:
            state = _wait_for(run_id)
            finished = _read_results(storage, key, chunk, state)
            results.update((r.cache_key, r) for r in finished)
            on_results(finished)
            progress.update(len(results))
    return results


def _wait_for(flow_run_id: Any, poll_s: float = 1.0) -> Any:
    """The chunk run's final state (Completed, Failed, Crashed...), or its state at the deadline."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + WAIT_FOR_CHUNK_S
    pause = threading.Event()
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if (state is not None and state.is_final()) or time.monotonic() > deadline:
                return state
            pause.wait(poll_s)


def _results_key(chunk_key: str) -> str:
    return chunk_key.removesuffix(".jsonl") + ".results.jsonl"


def _read_results(
    storage: Storage, chunk_key: str, chunk: Sequence[PlannedImage], state: Any
) -> list[RenderResult]:
    """The chunk run's results; if it died without writing them, its images are ERROR records
    (what it stored before dying is found by the next run's listing, never paid twice)."""
    try:
        lines = storage.get(_results_key(chunk_key)).splitlines()
        return [RenderResult.from_json(line) for line in lines if line.strip()]
    except (StorageError, OSError, ValueError):
        error = f"the chunk's flow run ended {getattr(state, 'name', 'unknown')} without results"
        return [
            RenderResult(cache_key=r.cache_key, finish_reason=FinishReason.ERROR, error=error)
            for r in chunk
        ]


@flow(name="render-chunk", persist_result=False, log_prints=True)
def render_chunk(
    destination: str,
    chunk_key: str,
    *,
    max_concurrency: int = 8,
    concurrency_limit: str | None = None,
    rate_limit: str | None = None,
    account_limit: str | None = None,
    credentials_block: str | None = None,
    aws_credentials_block: str | None = None,
    parent_flow_run_id: str | None = None,
) -> int:
    """Render one chunk of a batch on this worker; started by the batch, not by hand.

    Reads `<destination>/<chunk_key>` (one request a line), renders on threads holding the
    batch's limits, and writes `<chunk>.results.jsonl` beside it. Returns how many it rendered.
    """
    from prefect.blocks.core import Block

    from flux_flows.dispatch import _PlainRunner, render_windowed

    aws = Block.load(aws_credentials_block) if aws_credentials_block else None
    credentials = FireworksCredentials.load(credentials_block) if credentials_block else None
    storage = open_storage(destination, aws_credentials=aws)
    requests = [
        ImageRequest.model_validate_json(line)
        for line in iter_uri_lines(storage.uri_for(chunk_key), aws_credentials=aws)
        if line.strip()
    ]
    make_job = functools.partial(
        RenderJob,
        storage=storage,
        spill=SpillFolder(storage.root_uri),
        credentials=credentials,
        aws_credentials=aws,
        flow_run_id=parent_flow_run_id,
        concurrency_limit=concurrency_limit,
        rate_limit=rate_limit,
        account_limit=account_limit,
    )
    runner = _PlainRunner(max_concurrency)
    try:
        results = render_windowed(
            requests,
            lambda request: make_job(request=request),
            max_concurrency=max_concurrency,
            requests_per_minute=None,  # the batch's pace limit paces every image
            runner=runner,
        )
    finally:
        runner.shutdown()
    body = b"".join(r.to_json() + b"\n" for r in results.values())
    storage.put(_results_key(chunk_key), body, content_type=NDJSON)
    get_run_logger().info("chunk %s: %d images rendered", chunk_key, len(results))
    return len(results)
