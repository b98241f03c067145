"""Issue 26: a batch's end as one Prefect event and its manifest as an asset.

The events are caught by Prefect's own asserting events worker (`prefect.testing.fixtures`), on
real batches against the emulator over loopback and the session's Prefect API.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.events import Event
from prefect.events.clients import AssertingEventsClient
from prefect.events.worker import EventsWorker
from prefect.testing import fixtures as prefect_fixtures

from flux_flows.flows import generate_images, generate_images_from_file, replay_failed
from flux_flows.models import FinishReason
from flux_flows.records.assets import MATERIALIZED, REFERENCED, asset_key, valid_asset
from flux_flows.records.events import (
    COMPLETED,
    FAILED,
    LABELS,
    PAYLOAD_KEYS,
    outcome_of,
    payload_of,
    payload_size,
)
from flux_flows.results import BatchReport, ImageRecord

pytestmark = pytest.mark.usefixtures("flow_env")

# Prefect's own fixture: an events worker whose client keeps what it is sent.
events_worker = prefect_fixtures.asserting_events_worker

OURS = (COMPLETED, FAILED, MATERIALIZED, REFERENCED)


def sent(worker: EventsWorker) -> list[Event]:
    """The batch and asset events the worker was given, in order."""
    worker.drain()
    client = worker._client
    assert isinstance(client, AssertingEventsClient)
    return [e for e in client.events if e.event in OURS]


def batch_events(worker: EventsWorker) -> list[Event]:
    return [e for e in sent(worker) if e.event in (COMPLETED, FAILED)]


def test_a_batch_sends_one_completed_event_and_its_manifest_asset(
    tmp_path: Path, events_worker: EventsWorker
) -> None:
    out = tmp_path / "out"
    state = generate_images(["a red fox", "a blue whale"], str(out), return_state=True)
    report = state.result()
    events = sent(events_worker)
    [event] = [e for e in events if e.event in (COMPLETED, FAILED)]
    assert event.event == COMPLETED
    flow_run_id = str(state.state_details.flow_run_id)
    labels = event.resource
    assert labels.id == f"flux-flows.batch.{flow_run_id}"
    assert {name: labels.get(name) for name in LABELS} == {
        "flux-flows.destination": str(out),
        "flux-flows.outcome": "ok",
        "flux-flows.dry-run": "false",
        "flux-flows.flow": "generate-images",
        "flux-flows.deployment": "",
    }
    payload = event.payload
    assert list(payload) == list(PAYLOAD_KEYS)
    manifest = out / "manifest.jsonl"
    assert payload["manifest_uri"] == str(manifest) and manifest.is_file()
    assert payload["run_manifest_uri"] == report.manifest_uri
    assert payload["flow_run_id"] == flow_run_id
    assert payload["run_id"] and payload["run_id"] in report.manifest_uri
    assert payload["counts"]["SUCCESS"] == 2 and payload["requested"] == 2
    assert payload["contact_sheet_uri"] == report.contact_sheet_uri
    assert payload["problems"] is None and payload["source_uri"] is None
    assert payload_size(payload) < 4_000  # no records in it
    # The manifest as an asset, named by the event and carrying the run's figures.
    [asset] = [e for e in events if e.event == MATERIALIZED]
    assert asset.resource.id == f"file://{manifest}" == payload["manifest_asset_key"]
    assert asset.payload["run_manifest_uri"] == report.manifest_uri
    assert asset.payload["counts"]["SUCCESS"] == 2
    assert ("file://" + str(manifest), "manifest") in [(r.id, r.role) for r in event.related]
    assert events.index(asset) < events.index(event)  # the asset exists when a trigger fires


def test_events_false_sends_nothing(tmp_path: Path, events_worker: EventsWorker) -> None:
    report = generate_images(["a quiet owl"], str(tmp_path / "out"), events=False)
    assert report.counts["SUCCESS"] == 1
    assert sent(events_worker) == []


def test_failed_images_make_a_partial_batch_and_fail_on_error_a_failed_one(
    tmp_path: Path, events_worker: EventsWorker
) -> None:
    prompts = ["fine", "broken [[status:400]]", "forbidden fruit"]
    first = generate_images(prompts, str(tmp_path / "a"), safety_check=True, return_state=True)
    state = generate_images(
        prompts, str(tmp_path / "b"), fail_on_error=True, return_state=True, safety_check=True
    )
    assert state.is_failed()
    partial, failed = batch_events(events_worker)  # one each, in order
    assert partial.resource.id == f"flux-flows.batch.{first.state_details.flow_run_id}"
    assert (partial.event, partial.resource["flux-flows.outcome"]) == (COMPLETED, "partial")
    assert partial.payload["counts"]["ERROR"] == 1
    assert partial.payload["counts"]["CONTENT_FILTERED"] == 1
    [problem] = partial.payload["problems"]
    assert problem.startswith("image 1 variant 0:")
    assert failed.resource.id == f"flux-flows.batch.{state.state_details.flow_run_id}"
    assert (failed.event, failed.resource["flux-flows.outcome"]) == (FAILED, "failed")
    assert failed.payload["manifest_uri"] == str(tmp_path / "b" / "manifest.jsonl")


def test_a_batch_that_raises_sends_one_failed_event(
    tmp_path: Path, events_worker: EventsWorker
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    state = generate_images(["x"], str(blocker / "out"), return_state=True)
    assert state.is_failed()
    [event] = batch_events(events_worker)
    assert event.event == FAILED and event.resource["flux-flows.outcome"] == "failed"
    assert list(event.payload) == list(PAYLOAD_KEYS)
    assert event.payload["counts"] is None and event.payload["manifest_uri"] is None
    assert event.payload["problems"] and len(event.payload["problems"]) == 1


def test_a_dry_run_says_so_and_materializes_nothing(
    tmp_path: Path, events_worker: EventsWorker
) -> None:
    generate_images(["a plan only"], str(tmp_path / "out"), dry_run=True)
    events = sent(events_worker)
    assert [e.event for e in events] == [COMPLETED]
    assert events[0].resource["flux-flows.dry-run"] == "true"
    assert events[0].payload["manifest_uri"] is None
    assert events[0].payload["manifest_asset_key"] is None


def test_a_key_prefect_refuses_skips_the_asset_with_a_warning(
    tmp_path: Path, events_worker: EventsWorker, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "with space"
    report = generate_images(["a tidy desk"], str(out))
    assert report.counts["SUCCESS"] == 1
    events = sent(events_worker)
    assert [e.event for e in events] == [COMPLETED]  # no asset, and the batch went on
    assert events[0].payload["manifest_uri"] == str(out / "manifest.jsonl")
    assert events[0].payload["manifest_asset_key"] is None
    assert "is not recorded as a Prefect asset" in caplog.text


def test_the_prompt_file_is_the_manifests_upstream_asset(
    tmp_path: Path, events_worker: EventsWorker
) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("a lighthouse\na harbour\n")
    generate_images_from_file(str(source), str(tmp_path / "out"))
    events = sent(events_worker)
    [referenced] = [e for e in events if e.event == REFERENCED]
    [materialized] = [e for e in events if e.event == MATERIALIZED]
    assert referenced.resource.id == f"file://{source}"
    assert (f"file://{source}", "asset") in [(r.id, r.role) for r in materialized.related]
    [batch] = [e for e in events if e.event == COMPLETED]
    assert batch.payload["source_uri"] == str(source)
    assert batch.resource["flux-flows.flow"] == "generate-images-from-file"


def test_a_replay_sends_one_event_from_its_own_run(
    tmp_path: Path, events_worker: EventsWorker
) -> None:
    first = generate_images(["ok", "down [[flaky:5]]"], str(tmp_path))
    assert first.counts["ERROR"] == 1 and first.manifest_uri
    state = replay_failed(first.manifest_uri, return_state=True)
    events = batch_events(events_worker)
    assert len(events) == 2  # the first batch's, then the replay's: one each
    event = events[1]
    assert event.resource.id == f"flux-flows.batch.{state.state_details.flow_run_id}"
    assert event.resource["flux-flows.flow"] == "replay-failed"
    assert event.payload["source_uri"] == first.manifest_uri
    assert event.payload["manifest_uri"] == str(tmp_path / "manifest.jsonl")
    assert event.payload["counts"]["SUCCESS"] == 1


def test_the_payload_stays_small_whatever_the_errors() -> None:
    """Every documented key present; many long failures still make a few hundred bytes each."""
    errors = [
        ImageRecord.model_validate(
            {
                "index": i,
                "prompt": "p" * 10_000,
                "model": "m",
                "aspect_ratio": "1:1",
                "guidance_scale": 3.5,
                "num_inference_steps": 4,
                "seed": 1,
                "safety_check": False,
                "output_format": "jpeg",
                "cache_key": "0" * 32,
                "finish_reason": FinishReason.ERROR,
                "error": "boom " * 10_000,
            }
        )
        for i in range(10)
    ]
    counts = {"SUCCESS": 0, "CONTENT_FILTERED": 0, "ERROR": 10, "SKIPPED_BUDGET": 0, "PLANNED": 0}
    report = BatchReport(
        records=errors,
        counts=counts,
        api_calls=10,
        cache_hits=0,
        manifest_uri="s3://b/p/runs/r/manifest.jsonl",
        destination="s3://b/p",
        problems=["x" * 100_000],
    )
    payload = payload_of(
        report,
        outcome=outcome_of(report, False),
        run_id="r",
        flow_run_id=None,
        destination="s3://b/p",
        source_uri=None,
    )
    assert list(payload) == list(PAYLOAD_KEYS)
    assert payload["outcome"] == "partial" and payload["manifest_uri"] == "s3://b/p/manifest.jsonl"
    assert len(payload["problems"]) == 5
    assert payload_size(payload) < 4_000 < 1_500_000
    assert json.loads(json.dumps(payload)) == payload


@pytest.mark.parametrize(
    ("uri", "key"),
    [
        ("s3://bucket/a/manifest.jsonl", "s3://bucket/a/manifest.jsonl"),
        ("/data/out/manifest.jsonl", "file:///data/out/manifest.jsonl"),
        ("/data/with space/manifest.jsonl", None),
        ("s3://bucket/a?b/manifest.jsonl", None),
        ("s3://bucket/" + "k" * 600, None),
    ],
)
def test_asset_keys(uri: str, key: str | None) -> None:
    asset = valid_asset(uri, "the manifest")
    assert (asset.key if asset else None) == key
    assert asset_key(uri).startswith(("s3://", "file://"))
