"""Batches past what fits in a parameter or in memory (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client

from flux_flows import FinishReason, generate_images


def test_a_list_too_big_for_a_flow_parameter_is_staged_and_runs(
    tmp_path: Path, flow_env: Any
) -> None:
    """20,000 prompts (~1 MB of JSON, twice Prefect's parameter cap) plan like any list.

    A dry run stages in a temporary folder, gone when it returns (see test_staging.py); the
    staged rows are checked through the report, which holds every planned record."""
    prompts: list[Any] = [
        f"a staged lighthouse number {i} with a long tail of words" for i in range(20_000)
    ]
    prompts[7] = {"prompt": "an override", "seed": 7, "id": "sku-7"}
    state = generate_images(prompts, str(tmp_path), dry_run=True, return_state=True)
    report = state.result()
    assert report.counts[FinishReason.PLANNED] == 20_000 and flow_env.stats.requests == 0
    assert len(report.records) == 20_000  # a dry run stores no manifest: it keeps its records
    seventh = next(r for r in report.records if r.index == 7)
    assert (seventh.prompt, seventh.item_id) == ("an override", "sku-7")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    staged = run.parameters["staged_prompts"]
    assert run.parameters["prompts"] == []
    assert staged.endswith("/prompts.jsonl") and not Path(staged).exists()
    assert not (tmp_path / "runs").exists()  # nothing written into the destination
    assert len(json.dumps(run.parameters)) < 10_000  # readable, nowhere near the cap


def test_a_small_list_is_a_plain_parameter(tmp_path: Path, flow_env: Any) -> None:
    state = generate_images(["a small fox"], str(tmp_path), dry_run=True, return_state=True)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.parameters["prompts"] == ["a small fox"]
    assert run.parameters.get("staged_prompts") is None
    assert not (tmp_path / "runs").exists()


def test_a_bad_prompt_in_a_big_list_is_named_before_anything_is_written(
    tmp_path: Path, flow_env: Any
) -> None:
    import pytest

    prompts: list[Any] = [
        f"a long staged prompt about lighthouses number {i}" for i in range(8_000)
    ]
    prompts[4321] = {"prompt": "x", "colour": "red"}
    with pytest.raises(ValueError, match=r"prompts\[4321\]: unknown field 'colour'"):
        generate_images(prompts, str(tmp_path), dry_run=True)
    assert not (tmp_path / "runs").exists()


def test_a_big_run_streams_its_records_and_its_manifest(
    tmp_path: Path, flow_env: Any, monkeypatch: Any
) -> None:
    """Past KEEP_IN_MEMORY the report holds counts, not records; `records` reads the manifest."""
    from flux_flows.records import manifests

    monkeypatch.setattr(manifests, "KEEP_IN_MEMORY", 5)
    prompts = [f"a streamed gull {i}" for i in range(12)] + ["a streamed gull 3"]
    report = generate_images(prompts, str(tmp_path), max_concurrency=4)
    assert report.kept_records is None and report.requested == 13
    assert report.counts[FinishReason.SUCCESS] == 13 and report.api_calls == 12
    assert [r.index for r in report.records] == list(range(13))  # read back, in plan order
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt"] for x in lines] == prompts
    assert not list((tmp_path / "runs").glob("*/parts/*"))  # parts folded into the manifest


def test_parts_are_written_as_images_finish_and_kept_when_the_manifest_fails(
    tmp_path: Path, flow_env: Any
) -> None:
    """The destination takes every image, then refuses the manifest: a folder stands where
    `manifest.jsonl` goes, so the library's real write fails with the OS's own error (no
    storage call is replaced). The run says so, keeps a copy in the spill folder, and the parts
    it wrote as images finished (one per `flush_every` records, 200 by default) stay."""
    import inspect

    from flux_flows.rendering.window import render_windowed

    flush_every = inspect.signature(render_windowed).parameters["flush_every"].default
    n = 2 * flush_every + 1  # two full parts while the run goes on, and the last one
    dest = tmp_path / "dest"
    (dest / "manifest.jsonl").mkdir(parents=True)  # the destination's manifest cannot be written
    prompts = [f"a parted heron {i}" for i in range(n)]
    report = generate_images(prompts, str(dest), max_concurrency=16)
    assert report.counts[FinishReason.SUCCESS] == n and flow_env.stats.generations == n
    assert report.manifest_uri is None and len(report.problems) == 1
    problem = report.problems[0]
    assert problem.startswith(
        f"manifest NOT stored (could not write {dest / 'manifest.jsonl'}: Is a directory)"
    ), problem
    assert (dest / "manifest.jsonl").is_dir() and not list((dest / "manifest.jsonl").iterdir())
    parts = sorted(dest.glob("runs/*/parts/part-*.jsonl"))
    assert [len(p.read_text().splitlines()) for p in parts] == [flush_every, flush_every, 1]
    recorded = [json.loads(x) for p in parts for x in p.read_text().splitlines()]
    assert sorted(r["prompt"] for r in recorded) == sorted(prompts)
    assert all(r["finish_reason"] == "SUCCESS" and Path(r["uri"]).is_file() for r in recorded)
    kept = Path(problem.rsplit("a copy is kept at ", 1)[1])
    lines = [json.loads(x) for x in kept.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == prompts  # the whole manifest, in plan order


def test_spilled_images_are_found_whatever_the_destination_spelling(
    tmp_path: Path, flow_env: Any, monkeypatch: Any
) -> None:
    """Issue 16: a re-run into `/x/`, `./x` or `/x/../x` uploads what a run into `/x` spilled."""
    import os

    from flux_flows.errors import StorageError
    from flux_flows.storage import LocalStorage

    prompts = [f"a spilled kite {i}" for i in range(3)]
    original_put = LocalStorage.put

    def refuse_images(self: Any, key: str, data: bytes, **kwargs: Any) -> str:
        if key.startswith("images/"):
            raise StorageError("read-only file system (injected)")
        return original_put(self, key, data, **kwargs)

    monkeypatch.setattr(LocalStorage, "put", refuse_images)
    first = generate_images(prompts, str(tmp_path / "x"))
    assert first.spilled == 3 and flow_env.stats.generations == 3
    monkeypatch.setattr(LocalStorage, "put", original_put)

    monkeypatch.chdir(tmp_path)
    second = generate_images(prompts, "./x/../x/")
    assert second.api_calls == 0 and flow_env.stats.generations == 3  # nothing paid twice
    assert second.counts[FinishReason.SUCCESS] == 3 and second.spilled == 0
    assert len(os.listdir(tmp_path / "x" / "images")) == 3


def test_images_spilled_under_an_old_spelling_are_found(tmp_path: Path) -> None:
    """Folders written by earlier versions were keyed by the destination as typed."""
    from flux_flows.rendering.spill import SpillFolder

    typed = f"{tmp_path}/dest/"
    old = SpillFolder(typed, tmp_path / "spill")  # what an earlier version made
    old.save("ab" * 16, b"jpeg bytes", object_key="images/a.jpg", content_type="image/jpeg")
    canonical = SpillFolder(str(tmp_path / "dest"), tmp_path / "spill")
    assert canonical.path != old.path
    assert canonical.cache_keys() == {"ab" * 16}
    data, meta = canonical.load("ab" * 16)  # type: ignore[misc]
    assert data == b"jpeg bytes" and meta["object_key"] == "images/a.jpg"
    canonical.remove("ab" * 16)
    assert not old.cache_keys()


def test_the_streamed_plan_summary_agrees_with_the_plan_a_run_makes(
    tmp_path: Path, flow_env: Any
) -> None:
    """`plan` folds slices of rows; its figures must be the ones the run's own plan has."""
    from flux_flows.planning.plan import plan_run, summarize_plan
    from flux_flows.planning.sources import normalize_prompts
    from flux_flows.settings import BatchSettings
    from flux_flows.storage import open_storage

    generate_images(["a planned owl 1", "a planned owl 4"], str(tmp_path))  # two stored
    prompts = [f"a planned owl {i % 7}" for i in range(20)]  # duplicates across slices
    rows = normalize_prompts(prompts)
    settings = BatchSettings(variants=2, budget_usd=0.0099)
    storage = open_storage(str(tmp_path))
    plan = plan_run(rows, settings, storage)
    summary = summarize_plan(rows, settings, storage, batch_rows=3)
    assert (summary.requested, summary.distinct) == (len(plan.images), len(plan.unique))
    assert summary.stored == sum(1 for k in plan.unique if k in plan.stored) == 2
    assert summary.to_generate == len(plan.to_generate) and summary.to_generate > 0
    assert summary.skipped_for_budget == len(plan.skipped_for_budget) > 0
    assert abs(summary.estimated_cost_usd - plan.estimated_cost_usd) < 1e-9
    assert abs(summary.saved_usd - plan.saved_usd) < 1e-9


def test_a_planned_image_keeps_its_request_compactly_and_rebuilds_it_exactly() -> None:
    """The plan holds field values and the key, not a pydantic model per image; the request it
    rebuilds is the validated one, field for field, key and fields-set included."""
    import pickle
    import sys

    from flux_flows.models import ImageRequest
    from flux_flows.planning.plan import PlannedImage

    request = ImageRequest(prompt="a compact lighthouse", seed=11, aspect_ratio="16:9")
    planned = PlannedImage.of(3, 1, request, "sku-3")
    rebuilt = planned.request
    assert rebuilt == request and rebuilt.model_fields_set == request.model_fields_set
    assert planned.cache_key == request.cache_key == rebuilt.cache_key
    assert rebuilt.model_dump(exclude_unset=True) == request.model_dump(exclude_unset=True)
    assert pickle.loads(pickle.dumps(planned)) == planned  # crosses to Dask workers
    assert not hasattr(planned, "__dict__")
    assert sys.getsizeof(planned) + sys.getsizeof(planned.values) < 400


def test_render_results_cross_to_a_pool_as_json_lines_and_torn_lines_are_refused() -> None:
    import pytest

    from flux_flows.rendering.one_image import RenderResult

    result = RenderResult(
        cache_key="ab" * 16,
        finish_reason=FinishReason.SUCCESS,
        object_key="images/ab/x.jpg",
        thumbnail=True,
        size_bytes=1234,
        latency_s=0.25,
        api_calls=2,
    )
    line = result.to_json()
    assert RenderResult.from_json(line) == result
    for torn in (line[: len(line) // 2], b'{"cache_key": "x"}', b"[1]", b'{"surprise": 1}'):
        with pytest.raises(ValueError):
            RenderResult.from_json(torn)
