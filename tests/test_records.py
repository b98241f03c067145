"""`records`: how each planned image's manifest line is joined with its distinct request's outcome.

The manifest's totals are what was paid only if exactly one line of a distinct request carries
its API calls and cost; these tests build plans by hand (no flow, no API) and read the lines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flux_flows.models import FinishReason, ImageRequest
from flux_flows.planning import layout
from flux_flows.planning.cost import estimate_cost
from flux_flows.planning.plan import BatchPlan, PlannedImage, StoredImage, plan_batch
from flux_flows.records.join import finished_records, iter_records, record_of
from flux_flows.rendering.one_image import RenderResult
from flux_flows.storage import Storage, open_storage

SUCCESS, FILTERED, ERROR = (
    FinishReason.SUCCESS,
    FinishReason.CONTENT_FILTERED,
    FinishReason.ERROR,
)
PRICE = 0.01  # the test model's price, so that a line's cost says whether it was paid


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return open_storage(str(tmp_path / "dest"))


def request(prompt: str, seed: int = 1) -> ImageRequest:
    return ImageRequest(prompt=prompt, seed=seed)


PRICES = {request("any").model: PRICE}
COST = estimate_cost(request("any"), PRICES)  # what one paid image of these plans costs


def plan_of(
    prompts: list[str],
    stored: dict[str, StoredImage] | None = None,
    budget_usd: float | None = None,
) -> BatchPlan:
    """One planned image per prompt, in order; equal prompts are one distinct request."""
    images = [PlannedImage.of(i, 0, request(p), item_id=f"id-{i}") for i, p in enumerate(prompts)]
    return plan_batch(images, stored or {}, prices=PRICES, budget_usd=budget_usd)


def rendered(image: PlannedImage, finish: FinishReason = SUCCESS, **fields: object) -> RenderResult:
    values: dict[str, object] = {
        "object_key": layout.image_key(image.request, finish),
        "api_calls": 2,
        "request_id": f"req-{image.index}",
        "thumbnail": finish is SUCCESS,
        "width": 1024,
        "height": 1024,
        "content_type": "image/jpeg",
        "size_bytes": 1234,
        "latency_s": 0.5,
    }
    return RenderResult(image.cache_key, finish, **{**values, **fields})  # type: ignore[arg-type]


def test_a_rendered_image_carries_its_outcome_calls_and_cost(storage: Storage) -> None:
    plan = plan_of(["a red kite"])
    image = plan.images[0]
    result = rendered(image)
    (record,) = iter_records(plan, storage, {image.cache_key: result})
    assert (record.index, record.variant, record.item_id) == (0, 0, "id-0")
    assert record.cache_key == image.cache_key
    assert record.prompt == "a red kite" and record.seed == 1
    assert record.finish_reason is SUCCESS
    assert record.uri == storage.uri_for(result.object_key or "")
    assert record.thumbnail_uri == storage.uri_for(layout.thumbnail_key(image.cache_key))
    assert record.filtered_uri is None and record.error is None
    assert (record.width, record.height, record.size_bytes) == (1024, 1024, 1234)
    assert (record.request_id, record.latency_s) == ("req-0", 0.5)
    assert record.api_calls == 2 and record.estimated_cost_usd == COST
    assert record.cached is False


def test_duplicates_share_the_outcome_but_only_the_first_line_is_paid(storage: Storage) -> None:
    plan = plan_of(["a red kite", "a blue kite", "a red kite", "a red kite"])
    first = plan.images[0]
    results = {
        first.cache_key: rendered(first),
        plan.images[1].cache_key: rendered(plan.images[1]),
    }
    records = list(iter_records(plan, storage, results))
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert [r.item_id for r in records] == ["id-0", "id-1", "id-2", "id-3"]
    red = [records[0], records[2], records[3]]
    assert {r.uri for r in red} == {records[0].uri} and records[0].uri is not None
    assert [r.api_calls for r in red] == [2, 0, 0]
    assert [r.estimated_cost_usd for r in red] == [COST, 0.0, 0.0]
    assert [r.cached for r in red] == [False, True, True]
    assert sum(r.estimated_cost_usd for r in records) == pytest.approx(2 * COST)
    assert sum(r.api_calls for r in records) == 4


def test_already_stored_images_are_cached_and_unpaid(storage: Storage) -> None:
    planned = PlannedImage.of(0, 0, request("a red kite"))
    filtered = PlannedImage.of(1, 0, request("a grey kite"))
    stored = {
        planned.cache_key: StoredImage(layout.image_key(planned.request, SUCCESS), SUCCESS),
        filtered.cache_key: StoredImage(layout.image_key(filtered.request, FILTERED), FILTERED),
    }
    plan = plan_of(["a red kite", "a grey kite"], stored=stored)
    assert plan.to_generate == []
    kept, refused = iter_records(plan, storage, {})
    assert kept.finish_reason is SUCCESS and kept.cached is True
    assert kept.uri == storage.uri_for(stored[planned.cache_key].object_key)
    assert kept.thumbnail_uri == storage.uri_for(layout.thumbnail_key(planned.cache_key))
    assert refused.finish_reason is FILTERED and refused.uri is None
    assert refused.filtered_uri == storage.uri_for(stored[filtered.cache_key].object_key)
    assert refused.thumbnail_uri is None
    for record in (kept, refused):
        assert record.api_calls == 0 and record.estimated_cost_usd == 0.0
        assert (record.width, record.height) == (1024, 1024)


@pytest.mark.parametrize("how", ["recovered_from_spill", "already_stored"])
def test_an_image_found_rather_than_paid_for_costs_nothing(storage: Storage, how: str) -> None:
    plan = plan_of(["a red kite"])
    image = plan.images[0]
    (record,) = iter_records(plan, storage, {image.cache_key: rendered(image, **{how: True})})
    assert record.finish_reason is SUCCESS and record.uri is not None
    assert record.cached is True and record.estimated_cost_usd == 0.0


def test_an_error_is_recorded_with_its_calls_and_no_cost(storage: Storage) -> None:
    plan = plan_of(["a red kite", "a red kite"])
    image = plan.images[0]
    failed = RenderResult(image.cache_key, ERROR, api_calls=5, error="ServerError: 503 x5")
    first, again = iter_records(plan, storage, {image.cache_key: failed})
    assert first.finish_reason is ERROR and again.finish_reason is ERROR
    assert first.error == again.error == "ServerError: 503 x5"
    assert first.uri is None and first.filtered_uri is None and first.thumbnail_uri is None
    assert (first.api_calls, again.api_calls) == (5, 0)
    assert first.estimated_cost_usd == again.estimated_cost_usd == 0.0


def test_a_filtered_render_points_at_its_filtered_object(storage: Storage) -> None:
    plan = plan_of(["a red kite"])
    image = plan.images[0]
    result = rendered(image, FILTERED)
    (record,) = iter_records(plan, storage, {image.cache_key: result})
    assert record.uri is None and record.thumbnail_uri is None
    assert record.filtered_uri == storage.uri_for(result.object_key or "")
    assert record.estimated_cost_usd == COST  # a refused image is billed all the same


def test_a_spilled_image_names_its_spill_file(storage: Storage) -> None:
    plan = plan_of(["a red kite"])
    image = plan.images[0]
    result = rendered(image, object_key=None, thumbnail=False, spill_path="/spill/x.jpg")
    (record,) = iter_records(plan, storage, {image.cache_key: result})
    assert record.spill_path == "/spill/x.jpg" and record.uri is None
    assert record.thumbnail_uri is None and record.estimated_cost_usd == COST


def test_a_success_without_a_thumbnail_has_no_thumbnail_uri(storage: Storage) -> None:
    plan = plan_of(["a red kite"])
    image = plan.images[0]
    (record,) = iter_records(plan, storage, {image.cache_key: rendered(image, thumbnail=False)})
    assert record.uri is not None and record.thumbnail_uri is None


def test_skipped_for_budget_costs_only_on_its_first_line(storage: Storage) -> None:
    plan = plan_of(["a red kite", "a blue kite", "a blue kite"], budget_usd=COST)
    assert len(plan.skipped_for_budget) == 1
    red, blue, blue_again = iter_records(
        plan, storage, {plan.images[0].cache_key: rendered(plan.images[0])}
    )
    assert red.finish_reason is SUCCESS
    for record in (blue, blue_again):
        assert record.finish_reason is FinishReason.SKIPPED_BUDGET
        assert record.error is not None and "budget_usd" in record.error
        assert record.uri is None and record.api_calls == 0
    assert (blue.estimated_cost_usd, blue_again.estimated_cost_usd) == (COST, 0.0)


def test_a_dry_run_plans_each_distinct_request_once(storage: Storage) -> None:
    plan = plan_of(["a red kite", "a red kite", "a blue kite"])
    records = list(iter_records(plan, storage, {}))
    assert [r.finish_reason for r in records] == [FinishReason.PLANNED] * 3
    assert [r.cached for r in records] == [False, True, False]
    assert [r.estimated_cost_usd for r in records] == [COST, 0.0, COST]
    assert all(r.uri is None and r.api_calls == 0 for r in records)


def test_finished_records_are_one_paid_line_per_distinct_image(storage: Storage) -> None:
    """A manifest part holds each rendered image once, as its first line in the plan will."""
    plan = plan_of(["a red kite", "a blue kite", "a red kite"])
    red, blue = plan.images[0], plan.images[1]
    parts = list(finished_records(plan, storage, [rendered(blue), rendered(red)]))
    assert [(r.index, r.cache_key) for r in parts] == [(1, blue.cache_key), (0, red.cache_key)]
    assert all(r.api_calls == 2 and r.estimated_cost_usd == COST for r in parts)
    whole = {r.index: r for r in iter_records(plan, storage, {red.cache_key: rendered(red)})}
    assert parts[1] == whole[0]


def test_record_of_takes_first_as_given(storage: Storage) -> None:
    """`first` alone decides who carries the cost: the caller keeps the seen set."""
    plan = plan_of(["a red kite"])
    image = plan.images[0]
    results = {image.cache_key: rendered(image)}
    later = record_of(image, plan, storage, results, first=False, skipped=set())
    assert later.api_calls == 0 and later.estimated_cost_usd == 0.0 and later.cached is True
    assert later.uri is not None
