"""Spend control: dry runs, budget caps, price overrides and replays, counted at the emulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flux_flows.flows import generate_images, replay_failed
from flux_flows.models import DEV, SCHNELL, FinishReason, ImageRequest
from flux_flows.planning.cost import PER_STEP_USD, estimate_cost, price_table
from flux_flows.records.reports import summary_markdown

pytestmark = pytest.mark.usefixtures("flow_env")
SCHNELL_IMAGE = 4 * PER_STEP_USD[SCHNELL]


def test_dry_run_spends_nothing_and_tells_what_is_stored(tmp_path: Path, flow_env: Any) -> None:
    prompts = [f"plan {i}" for i in range(6)]
    generate_images(prompts[:2], str(tmp_path))
    calls = flow_env.stats.requests
    plan = generate_images(prompts, str(tmp_path), dry_run=True)
    assert flow_env.stats.requests == calls
    assert plan.dry_run and plan.api_calls == 0
    assert plan.cache_hits == 2
    assert plan.counts["PLANNED"] == 4
    assert plan.estimated_cost_usd == pytest.approx(4 * SCHNELL_IMAGE)
    assert plan.saved_usd == pytest.approx(2 * SCHNELL_IMAGE)
    assert plan.manifest_uri is None
    assert not (tmp_path / "runs").exists() or len(list((tmp_path / "runs").iterdir())) == 1


def test_budget_stops_submitting_and_records_skipped(tmp_path: Path, flow_env: Any) -> None:
    prompts = [f"budget {i}" for i in range(8)]
    report = generate_images(prompts, str(tmp_path), budget_usd=3 * SCHNELL_IMAGE + 0.0001)
    reasons = [r.finish_reason for r in report.records]
    assert reasons == [FinishReason.SUCCESS] * 3 + [FinishReason.SKIPPED_BUDGET] * 5
    assert flow_env.stats.generations == 3
    assert report.estimated_cost_usd == pytest.approx(3 * SCHNELL_IMAGE)
    assert report.estimated_cost_usd <= 3 * SCHNELL_IMAGE + 0.0001
    assert "skipped for budget | 5" in summary_markdown(report)
    manifest = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [m["finish_reason"] for m in manifest].count("SKIPPED_BUDGET") == 5
    # Stored images do not count against the next run's budget.
    again = generate_images(prompts, str(tmp_path), budget_usd=2 * SCHNELL_IMAGE + 0.0001)
    assert again.cache_hits == 3 and again.counts["SUCCESS"] == 5
    assert flow_env.stats.generations == 5


def test_zero_budget_generates_nothing(tmp_path: Path, flow_env: Any) -> None:
    report = generate_images(["a", "b"], str(tmp_path), budget_usd=0)
    assert report.counts["SKIPPED_BUDGET"] == 2 and flow_env.stats.requests == 0


def test_replay_resubmits_only_errors_with_their_seeds(tmp_path: Path, flow_env: Any) -> None:
    prompts = ["ok one", "ok two", "down [[flaky:5]]", {"prompt": "later", "id": "x"}]
    first = generate_images(prompts, str(tmp_path), budget_usd=3 * SCHNELL_IMAGE + 0.0001)
    assert [r.finish_reason for r in first.records] == [
        FinishReason.SUCCESS,
        FinishReason.SUCCESS,
        FinishReason.ERROR,
        FinishReason.SKIPPED_BUDGET,
    ]
    requests_before = flow_env.stats.requests
    assert first.manifest_uri
    replayed = replay_failed(first.manifest_uri)
    assert flow_env.stats.requests == requests_before + 1
    assert [r.finish_reason for r in replayed.records] == [FinishReason.SUCCESS]
    assert replayed.records[0].seed == first.records[2].seed
    assert replayed.records[0].cache_key == first.records[2].cache_key
    assert replayed.destination == first.destination
    assert replayed.manifest_uri and replayed.manifest_uri != first.manifest_uri
    with_skipped = replay_failed(first.manifest_uri, include_skipped=True)
    assert with_skipped.records[-1].item_id == "x"
    assert with_skipped.records[-1].finish_reason is FinishReason.SUCCESS
    assert with_skipped.cache_hits == 1  # the error replayed above is stored already


def test_replay_of_a_clean_manifest_does_nothing(tmp_path: Path, flow_env: Any) -> None:
    first = generate_images(["clean"], str(tmp_path))
    calls = flow_env.stats.requests
    replayed = replay_failed(str(tmp_path / "manifest.jsonl"))
    assert replayed.records == [] and flow_env.stats.requests == calls
    assert first.counts["SUCCESS"] == 1


def test_replay_of_a_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        replay_failed(str(tmp_path / "nope.jsonl"))


def test_prices_are_overridable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    request = ImageRequest(prompt="x", model=DEV, num_inference_steps=30)
    assert estimate_cost(request) == pytest.approx(30 * PER_STEP_USD[DEV])
    monkeypatch.setenv("FLUX_FLOWS_PRICES", json.dumps({DEV: 0.001}))
    assert estimate_cost(request) == pytest.approx(0.03)
    assert price_table({DEV: 0.002})[DEV] == 0.002
    report = generate_images(["priced"], str(tmp_path), prices={SCHNELL: 0.01})
    assert report.estimated_cost_usd == pytest.approx(0.04)


@pytest.mark.parametrize("value", ["not json", "[1, 2]"])
def test_bad_price_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FLUX_FLOWS_PRICES", value)
    with pytest.raises(ValueError, match="FLUX_FLOWS_PRICES"):
        price_table()


def test_negative_budget_is_refused(tmp_path: Path, flow_env: Any) -> None:
    with pytest.raises(ValueError, match="budget_usd"):
        generate_images(["a"], str(tmp_path), budget_usd=-1)
    assert flow_env.stats.requests == 0


def test_replay_keeps_the_destination_manifest_whole(tmp_path: Path, flow_env: Any) -> None:
    """Issue 16: a replay writes its own run manifest and merges its outcomes into the
    destination's, which still lists every image, with the original indexes."""
    import json

    prompts = ["keep a", "keep b", "fails [[flaky:5]]", "keep d"]
    first = generate_images(prompts, str(tmp_path), variants=2)
    assert first.counts["ERROR"] == 2 and first.manifest_uri
    replayed = replay_failed(first.manifest_uri)
    assert [(r.index, r.variant) for r in replayed.records] == [(2, 0), (2, 1)]
    assert all(r.finish_reason is FinishReason.SUCCESS for r in replayed.records)
    assert replayed.manifest_uri and len(Path(replayed.manifest_uri).read_text().splitlines()) == 2
    latest = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [(r["index"], r["variant"]) for r in latest] == [
        (i, v) for i in range(4) for v in (0, 1)
    ]
    assert all(r["finish_reason"] == "SUCCESS" for r in latest)
    sheet = (tmp_path / "contact-sheet.html").read_text()
    assert all(p.split(" [[")[0] in sheet for p in prompts)  # every image, not just the replayed


def test_replay_failed_is_public() -> None:
    import flux_flows

    assert "replay_failed" in flux_flows.__all__ and flux_flows.replay_failed is replay_failed
