"""Manifest records: each planned image joined with how its distinct request ended.

A prompt asked for twice, or already stored, still gets its own line; only the first line of a
distinct request carries its API calls and cost, so the manifest's totals are what was paid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from flux_flows.models import FinishReason
from flux_flows.planning import layout
from flux_flows.planning.plan import BatchPlan, PlannedImage
from flux_flows.rendering.one_image import RenderResult
from flux_flows.results import ImageRecord
from flux_flows.storage import Storage


def record_of(
    planned: PlannedImage,
    plan: BatchPlan,
    storage: Storage,
    results: Mapping[str, RenderResult],
    first: bool,
    skipped: set[str],
) -> ImageRecord:
    """One manifest line: the planned image joined with how its distinct request ended."""
    key, request = planned.cache_key, planned.request
    base: dict[str, Any] = {
        "index": planned.index,
        "variant": planned.variant,
        "item_id": planned.item_id,
        "prompt_template": plan.prompt_template,
        "columns": planned.columns,
    }
    if key in plan.stored:
        return _found_stored(planned, plan, storage, base)
    # Only the first line of a distinct request carries its cost and calls.
    cost = plan.cost_by_key[key] if first else 0.0
    if key in skipped:
        return ImageRecord.for_request(
            request,
            **base,
            finish_reason=FinishReason.SKIPPED_BUDGET,
            error="not generated: the run's budget_usd would have been exceeded",
            estimated_cost_usd=cost,
        )
    if key not in results:  # a dry run
        return ImageRecord.for_request(
            request,
            **base,
            finish_reason=FinishReason.PLANNED,
            cached=not first,
            estimated_cost_usd=cost,
        )
    return _rendered(planned, results[key], cost, storage, base, first)


def _found_stored(
    planned: PlannedImage, plan: BatchPlan, storage: Storage, base: dict[str, Any]
) -> ImageRecord:
    """An image the destination held before the run: no call, no cost."""
    key, request = planned.cache_key, planned.request
    stored = plan.stored[key]
    uri: str | None = storage.uri_for(stored.object_key)
    success = stored.finish_reason is FinishReason.SUCCESS
    return ImageRecord.for_request(
        request,
        **base,
        finish_reason=stored.finish_reason,
        uri=uri if success else None,
        filtered_uri=None if success else uri,
        # Made with the image; if it went missing since, the contact sheet shows the image.
        thumbnail_uri=storage.uri_for(layout.thumbnail_key(key)) if success else None,
        cached=True,
        width=request.size[0],
        height=request.size[1],
        content_type=request.content_type,
    )


def _rendered(
    planned: PlannedImage,
    result: RenderResult,
    cost: float,
    storage: Storage,
    base: dict[str, Any],
    first: bool,
) -> ImageRecord:
    """An image this run rendered (or found stored under its lease, or took from the spill)."""
    success = result.finish_reason is FinishReason.SUCCESS
    uri = storage.uri_for(result.object_key) if result.object_key else None
    unpaid = result.recovered_from_spill or result.already_stored
    paid = first and not unpaid and result.finish_reason != FinishReason.ERROR
    thumbnail = success and result.thumbnail
    return ImageRecord.for_request(
        planned.request,
        **base,
        finish_reason=result.finish_reason,
        uri=uri if success else None,
        filtered_uri=uri if result.finish_reason is FinishReason.CONTENT_FILTERED else None,
        thumbnail_uri=storage.uri_for(layout.thumbnail_key(planned.cache_key))
        if thumbnail
        else None,
        cached=not first or unpaid,
        error=result.error,
        spill_path=result.spill_path,
        width=result.width,
        height=result.height,
        content_type=result.content_type,
        size_bytes=result.size_bytes,
        request_id=result.request_id,
        latency_s=result.latency_s,
        api_calls=result.api_calls if first else 0,
        estimated_cost_usd=cost if paid else 0.0,
    )


def iter_records(
    plan: BatchPlan, storage: Storage, results: Mapping[str, RenderResult]
) -> Iterator[ImageRecord]:
    """Every planned image's record, in plan order, made one at a time (they are streamed)."""
    seen: set[str] = set()
    skipped = set(plan.skipped_for_budget)
    for planned in plan.images:
        key = planned.cache_key
        yield record_of(planned, plan, storage, results, first=key not in seen, skipped=skipped)
        seen.add(key)


def finished_records(
    plan: BatchPlan, storage: Storage, finished: Iterable[RenderResult]
) -> Iterator[ImageRecord]:
    """The records of images just rendered, for the run's manifest parts: one per distinct
    image, as its first request in the plan will have it."""
    for result in finished:
        planned = plan.unique[result.cache_key]
        yield record_of(
            planned, plan, storage, {result.cache_key: result}, first=True, skipped=set()
        )
