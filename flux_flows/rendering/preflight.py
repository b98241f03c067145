"""What a run checks before it spends anything: the destination, the spill folder, the key,
the limits it was asked to hold. Each is free to find out and expensive to find late."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefect import get_run_logger

from flux_flows.blocks import shared_client
from flux_flows.planning.claims import check_claims_writable
from flux_flows.rendering.limit_settings import check_rate_limit
from flux_flows.rendering.spill import SpillFolder
from flux_flows.settings import BatchOptions
from flux_flows.storage import Storage

T = TypeVar("T")


def preflight(options: BatchOptions, storage: Storage, spill: SpillFolder) -> None:
    """Fail before any spend: an unwritable destination or a missing key costs nothing to find.

    A dry run writes nothing into its destination (its staged parameters go to a temporary
    folder, see `staging`), so a read-only destination is fine for one: only what it reads is
    checked, by reading it.
    """
    if not options.dry_run:
        storage.check_writable()
        # Overlapping runs coordinate in claims/: unwritable, no image could be held safely.
        check_claims_writable(storage)
        # The fallback for a failed upload must work before an image is paid for.
        spill.check_writable()
        shared_client(options.credentials)
        if options.concurrency_limit:
            check_concurrency_limit(options.concurrency_limit)
        if options.rate_limit:
            check_rate_limit(options.rate_limit)
        if options.chunk_deployment:
            check_chunk_deployment(options.chunk_deployment)


def _read_or_explain(read: Callable[[Any], T], missing: str) -> T:
    """Read an object from the Prefect API; a missing one is a ValueError saying what to do."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return read(client)
        except ObjectNotFound:
            raise ValueError(f"{missing} (nothing was generated)") from None


def check_concurrency_limit(name: str) -> None:
    """A misspelt limit name would otherwise fail every image (or, unchecked, limit nothing)."""
    limit = _read_or_explain(
        lambda client: client.read_global_concurrency_limit_by_name(name),
        f"concurrency_limit={name!r}: no Prefect global concurrency limit has this name; "
        f"create it with `prefect gcl create {name} --limit 8`",
    )
    if not limit.active:
        get_run_logger().warning(
            "global concurrency limit %r is inactive: API calls are not limited by it", name
        )


def check_chunk_deployment(name: str) -> None:
    """The work-pool path needs a deployment of the render-chunk flow; say how to make one."""
    deployment = _read_or_explain(
        lambda client: client.read_deployment_by_name(name),
        f"chunk_deployment={name!r}: no such deployment; deploy the render-chunk flow with "
        "`prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --name "
        "flux-flows-chunks`",
    )
    if not deployment.entrypoint or not deployment.entrypoint.endswith(":render_chunk"):
        raise ValueError(
            f"chunk_deployment={name!r} runs {deployment.entrypoint!r}, not the render-chunk flow "
            "(flux_flows/rendering/work_pools.py:render_chunk)"
        )
