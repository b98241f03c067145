"""A work-pool batch's chunk files live in the destination, where anyone who can write to it can
rewrite them: the batch and its chunk runs verify them instead of trusting them (`pools`).

- `read_results`: only results for images planned in the chunk count; a SUCCESS or
  CONTENT_FILTERED only at the object the plan expects, found in the destination; anything
  else, and a planned image without a result, is an ERROR record saying why; nothing in the
  file can make the batch raise.
- `render_chunk`: a requests file whose SHA-256 is not the batch's is refused before any spend.
- Through the batch (`generate_images(chunk_deployment=...)`) with the chunk runs started in this
  process instead of on a pool's workers: the manifest is written whatever the files say.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prefect.states import Completed, Failed

from flux_flows.models import FinishReason, ImageRequest
from flux_flows.planning import layout
from flux_flows.planning.plan import PlannedImage
from flux_flows.rendering.chunk_files import (
    NDJSON,
    RESULT_LINE_MAX_BYTES,
    RESULTS_SLACK_BYTES,
    ChunkFileChanged,
    read_results,
    results_key,
)
from flux_flows.rendering.one_image import RenderResult
from flux_flows.rendering.work_pools import render_chunk
from flux_flows.storage import Storage, open_storage

CHUNK_KEY = "runs/20250101T000000Z-test/chunks/chunk-00001.jsonl"
RESULTS_KEY = results_key(CHUNK_KEY)
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
SUCCESS, FILTERED, ERROR = (
    FinishReason.SUCCESS,
    FinishReason.CONTENT_FILTERED,
    FinishReason.ERROR,
)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return open_storage(str(tmp_path / "dest"))


def planned(n: int, prompt: str = "a verified lantern") -> list[PlannedImage]:
    return [
        PlannedImage.of(i, 0, ImageRequest(prompt=f"{prompt} {i}", seed=i + 1)) for i in range(n)
    ]


def store(storage: Storage, image: PlannedImage, finish: FinishReason = SUCCESS) -> str:
    key = layout.image_key(image.request, finish)
    storage.put(key, JPEG, content_type="image/jpeg")
    return key


def reported(image: PlannedImage, finish: FinishReason = SUCCESS, **fields: Any) -> RenderResult:
    """What a chunk run writes for an image it paid for and stored."""
    values: dict[str, Any] = {
        "object_key": layout.image_key(image.request, finish),
        "api_calls": 1,
        "request_id": f"req-{image.index}",
        "thumbnail": finish is SUCCESS,
    }
    return RenderResult(cache_key=image.cache_key, finish_reason=finish, **{**values, **fields})


def write_results(storage: Storage, lines: Sequence[RenderResult | bytes]) -> None:
    body = b"".join((r if isinstance(r, bytes) else r.to_json()) + b"\n" for r in lines)
    storage.put(RESULTS_KEY, body, content_type=NDJSON)


def by_key(results: list[RenderResult]) -> dict[str, RenderResult]:
    return {r.cache_key: r for r in results}


# --------------------------------------------------------------------------------------------
# The batch reads a chunk's results back (`read_results`)
# --------------------------------------------------------------------------------------------


def test_verified_results_are_kept_as_the_chunk_reported_them(storage: Storage) -> None:
    images = planned(3)
    store(storage, images[0])
    store(storage, images[1], FILTERED)
    results = [
        reported(images[0], api_calls=2, throttled=1),
        reported(images[1], FILTERED),
        RenderResult(images[2].cache_key, ERROR, api_calls=3, error="FireworksError: 500 x3"),
    ]
    write_results(storage, results)
    got = read_results(storage, CHUNK_KEY, images, Completed())
    assert got == results  # the same objects' values, in plan order, nothing changed


def test_a_success_rewritten_from_error_is_an_error_that_says_why(storage: Storage) -> None:
    """Hostile tester #1: an unpaid ERROR rewritten as SUCCESS, naming the object where the
    plan would have put it, which does not exist."""
    images = planned(2)
    store(storage, images[1])
    write_results(storage, [reported(images[0], api_calls=2), reported(images[1])])
    got = by_key(read_results(storage, CHUNK_KEY, images, Completed()))
    forged = got[images[0].cache_key]
    uri = storage.uri_for(layout.image_key(images[0].request))
    assert forged.finish_reason is ERROR
    assert forged.error == f"the chunk's results file says SUCCESS but {uri} does not exist"
    assert forged.object_key is None and not forged.thumbnail  # no URI, no thumbnail to show
    assert forged.api_calls == 2  # reported spent: kept
    assert got[images[1].cache_key].finish_reason is SUCCESS  # the honest one is untouched


@pytest.mark.parametrize(
    "object_key",
    [
        "images/someone-elses-image.jpg",  # exists, but is not this image
        "../../outside.jpg",  # not even a key of the destination
    ],
)
def test_a_success_naming_another_object_is_an_error(storage: Storage, object_key: str) -> None:
    images = planned(1)
    storage.put("images/someone-elses-image.jpg", JPEG, content_type="image/jpeg")
    write_results(storage, [reported(images[0], object_key=object_key)])
    [got] = read_results(storage, CHUNK_KEY, images, Completed())
    assert got.finish_reason is ERROR and got.object_key is None
    assert "where the plan puts it" in (got.error or "")
    assert storage.uri_for(layout.image_key(images[0].request)) in (got.error or "")


def test_a_filtered_answer_claimed_as_success_is_an_error(storage: Storage) -> None:
    """CONTENT_FILTERED bytes are stored under filtered/: a SUCCESS pointing there is not one."""
    images = planned(1)
    key = store(storage, images[0], FILTERED)
    write_results(storage, [reported(images[0], SUCCESS, object_key=key)])
    [got] = read_results(storage, CHUNK_KEY, images, Completed())
    assert got.finish_reason is ERROR and "where the plan puts it" in (got.error or "")


def test_a_success_kept_only_on_the_workers_disk_is_an_error(storage: Storage) -> None:
    images = planned(1)
    spilled = reported(
        images[0], object_key=None, spill_path="/w/spill/x.jpg", error="upload failed: 503"
    )
    write_results(storage, [spilled])
    [got] = read_results(storage, CHUNK_KEY, images, Completed())
    assert got.finish_reason is ERROR and got.api_calls == 1
    assert got.spill_path == "/w/spill/x.jpg"  # where the paid-for bytes may still be
    assert "names no object in the destination" in (got.error or "")
    assert "upload failed: 503" in (got.error or "")


def test_a_result_for_an_unplanned_image_is_dropped_with_a_warning(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """Hostile tester #2: a result for a cache key the chunk did not plan used to be returned,
    and the batch's manifest writer then raised KeyError after the money was spent."""
    images = planned(2)
    stranger = planned(1, prompt="nobody asked for this")[0]
    store(storage, images[0])
    store(storage, images[1])
    store(storage, stranger)  # even stored: it is not this chunk's
    write_results(storage, [reported(images[0]), reported(stranger), reported(images[1])])
    with caplog.at_level(logging.WARNING, logger="flux_flows.rendering.work_pools"):
        got = read_results(storage, CHUNK_KEY, images, Completed())
    assert [r.cache_key for r in got] == [p.cache_key for p in images]
    assert all(r.finish_reason is SUCCESS for r in got)
    assert storage.uri_for(RESULTS_KEY) in caplog.text
    assert "did not plan" in caplog.text and stranger.cache_key in caplog.text


def test_a_planned_image_missing_from_the_results_is_an_error(storage: Storage) -> None:
    images = planned(3)
    for image in images:
        store(storage, image)
    write_results(storage, [reported(images[0]), reported(images[2])])
    got = read_results(storage, CHUNK_KEY, images, Completed())
    assert [r.cache_key for r in got] == [p.cache_key for p in images]
    assert [r.finish_reason for r in got] == [SUCCESS, ERROR, SUCCESS]
    assert "has no result for it" in (got[1].error or "")
    assert storage.uri_for(RESULTS_KEY) in (got[1].error or "")


def test_a_repeated_result_does_not_replace_the_first(storage: Storage) -> None:
    images = planned(1)
    store(storage, images[0])
    write_results(
        storage, [reported(images[0]), RenderResult(images[0].cache_key, ERROR, error="x")]
    )
    [got] = read_results(storage, CHUNK_KEY, images, Completed())
    assert got.finish_reason is SUCCESS


@pytest.mark.parametrize(
    "line",
    [
        b'{"cache_key": "abc", "finish_reason": "SUC',  # a torn write
        b"not json at all",
        b"[1, 2, 3]",
        b'{"cache_key": ["not", "hashable"], "finish_reason": "SUCCESS"}',
        b'{"cache_key": "k", "finish_reason": "SUCCESS", "api_calls": "lots"}',
        b'{"cache_key": "k", "finish_reason": "SUCCESS", "api_calls": -5}',
        b'{"cache_key": "k", "finish_reason": "SUCCESS", "latency_s": NaN}',
        b'{"cache_key": "k", "finish_reason": "SUCCESS", "thumbnail": "yes"}',
        b'{"cache_key": "k", "finish_reason": "SUCCESS", "object_key": 7}',
        b'{"cache_key": "k", "finish_reason": "BOGUS"}',
        b'{"cache_key": "k", "finish_reason": "SUCCESS", "extra": 1}',
        b"[" * 20_000,  # too deep for the JSON parser: RecursionError, not ValueError
        b"\xff\xfe not utf-8",
    ],
)
def test_a_malformed_results_line_makes_the_chunk_error_without_raising(
    storage: Storage, line: bytes
) -> None:
    images = planned(2)
    for image in images:
        store(storage, image)
    write_results(storage, [reported(images[0]), line, reported(images[1])])
    got = read_results(storage, CHUNK_KEY, images, Completed())
    assert [r.cache_key for r in got] == [p.cache_key for p in images]
    assert all(r.finish_reason is ERROR for r in got)
    assert all("is not a chunk run's" in (r.error or "") for r in got)


def test_every_field_of_a_result_line_is_type_checked() -> None:
    """A field added to RenderResult with an annotation the check cannot read would go
    unchecked: the batch would record whatever a results file put there."""
    import dataclasses

    from flux_flows.rendering.chunk_files import _RESULT_TYPES

    assert set(_RESULT_TYPES) == {f.name for f in dataclasses.fields(RenderResult)}


def test_a_results_file_too_big_for_its_chunk_is_not_read(storage: Storage) -> None:
    images = planned(2)
    limit = RESULTS_SLACK_BYTES + RESULT_LINE_MAX_BYTES * len(images)
    storage.put(RESULTS_KEY, b"x" * (limit + 1), content_type=NDJSON)
    got = read_results(storage, CHUNK_KEY, images, Completed())
    assert all(r.finish_reason is ERROR for r in got)
    assert all(f"over the {limit}" in (r.error or "") for r in got)


def test_a_run_that_ended_without_results_says_how_it_ended(storage: Storage) -> None:
    images = planned(2)
    state = Failed(message="Flow run encountered an exception: ChunkFileChanged: chunk X")
    got = read_results(storage, CHUNK_KEY, images, state)
    assert [r.finish_reason for r in got] == [ERROR, ERROR]
    assert got[0].error == (
        "the chunk's flow run ended Failed without results: Flow run encountered an exception: "
        "ChunkFileChanged: chunk X"
    )


# --------------------------------------------------------------------------------------------
# The chunk run checks its requests file before any spend (`render_chunk`)
# --------------------------------------------------------------------------------------------


def write_requests(storage: Storage, images: Sequence[PlannedImage]) -> str:
    """The chunk's requests file, as the batch writes it; returns its SHA-256."""
    body = b"".join(p.request.model_dump_json().encode() + b"\n" for p in images)
    storage.put(CHUNK_KEY, body, content_type=NDJSON)
    return hashlib.sha256(body).hexdigest()


def test_a_swapped_requests_file_is_refused_before_any_spend(
    storage: Storage, fireworks_env: Any
) -> None:
    """Hostile tester #3: the batch planned one chunk; someone swapped its file for another
    (more, or other, images) before the run read it. The run must not pay for them."""
    sha = write_requests(storage, planned(2))
    write_requests(storage, planned(5, prompt="images nobody planned"))
    with pytest.raises(ChunkFileChanged) as caught:
        render_chunk.fn(storage.root_uri, CHUNK_KEY, requests_sha256=sha, heartbeat_s=60)
    message = str(caught.value)
    assert CHUNK_KEY in message and "not the one the batch wrote" in message and sha in message
    assert fireworks_env.stats.generations == 0  # type: ignore[attr-defined]
    assert not storage.exists(RESULTS_KEY)
    assert not storage.list_keys(layout.IMAGES)


def test_a_requests_file_with_one_byte_changed_is_refused(
    storage: Storage, fireworks_env: Any
) -> None:
    images = planned(1)
    sha = write_requests(storage, images)
    body = storage.get(CHUNK_KEY).replace(b'"seed":1', b'"seed":2')
    storage.put(CHUNK_KEY, body, content_type=NDJSON)
    with pytest.raises(ChunkFileChanged, match="chunk-00001"):
        render_chunk.fn(storage.root_uri, CHUNK_KEY, requests_sha256=sha, heartbeat_s=60)
    assert fireworks_env.stats.generations == 0  # type: ignore[attr-defined]


def test_a_refused_chunk_run_ends_failed_and_the_batch_records_why(
    storage: Storage, flow_env: Any
) -> None:
    """The flow run itself ends Failed; what the batch reads back names the chunk and why."""
    images = planned(2)
    sha = write_requests(storage, images)
    write_requests(storage, planned(3, prompt="swapped in"))
    state = render_chunk(storage.root_uri, CHUNK_KEY, requests_sha256=sha, return_state=True)
    assert state.is_failed()
    got = read_results(storage, CHUNK_KEY, images, state)
    assert [r.finish_reason for r in got] == [ERROR, ERROR]
    assert all(CHUNK_KEY in (r.error or "") for r in got)
    assert all("not the one the batch wrote" in (r.error or "") for r in got)
    assert flow_env.stats.generations == 0


def test_an_untouched_chunk_is_rendered_and_its_results_verified(
    storage: Storage, flow_env: Any
) -> None:
    images = planned(3)
    sha = write_requests(storage, images)
    state = render_chunk(storage.root_uri, CHUNK_KEY, requests_sha256=sha, return_state=True)
    assert state.is_completed() and state.result() == 3
    got = read_results(storage, CHUNK_KEY, images, state)
    assert [r.finish_reason for r in got] == [SUCCESS] * 3
    assert [r.object_key for r in got] == [layout.image_key(p.request) for p in images]
    assert flow_env.stats.generations == 3


# --------------------------------------------------------------------------------------------
# Through the batch: chunk runs started in this process instead of on a pool
# --------------------------------------------------------------------------------------------


def run_batch_on_fake_pool(
    monkeypatch: pytest.MonkeyPatch,
    destination: str,
    prompts: list[str],
    chunk_run: Callable[[dict[str, Any]], Any],
) -> tuple[Any, list[dict[str, Any]]]:
    """generate_images(chunk_deployment=...) where each chunk "run" is `chunk_run(parameters)`
    in this process (it returns the run's final state); everything else is the real batch."""
    import prefect.deployments

    import flux_flows.rendering.preflight as preflight
    import flux_flows.rendering.work_pools as pools
    from flux_flows.flows import generate_images

    sent: list[dict[str, Any]] = []
    states: dict[int, Any] = {}

    class Run:
        def __init__(self, number: int) -> None:
            self.id = number

    def run_deployment(name: str, *, parameters: dict[str, Any], **_: Any) -> Run:
        sent.append(parameters)
        states[len(sent)] = chunk_run(parameters)
        return Run(len(sent))

    monkeypatch.setattr(preflight, "check_chunk_deployment", lambda name: None)
    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    monkeypatch.setattr(pools, "_wait_for", lambda run_id, *args: states[run_id])
    report = generate_images(
        prompts, destination, chunk_size=2, chunk_deployment="render-chunk/in-process"
    )
    return report, sent


def test_a_batch_records_forged_results_as_errors_and_still_writes_its_manifest(
    tmp_path: Path, flow_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A "worker" that pays for nothing and writes a results file claiming everything, plus an
    image nobody planned: the batch's records say what is really in the destination."""
    destination = str(tmp_path / "dest")
    storage = open_storage(destination)
    stranger = planned(1, prompt="unplanned")[0]

    def forging_run(parameters: dict[str, Any]) -> Any:
        lines = storage.get(parameters["chunk_key"]).splitlines()
        requests = [ImageRequest.model_validate_json(line) for line in lines]
        chunk = [PlannedImage.of(0, 0, r) for r in requests]
        store(storage, chunk[0])  # the first of each chunk really is stored
        forged = [reported(p, api_calls=1) for p in chunk] + [reported(stranger)]
        storage.put(
            results_key(parameters["chunk_key"]),
            b"".join(r.to_json() + b"\n" for r in forged),
            content_type=NDJSON,
        )
        return Completed()

    prompts = [f"a forged lantern {i}" for i in range(4)]
    report, sent = run_batch_on_fake_pool(monkeypatch, destination, prompts, forging_run)
    assert len(sent) == 2
    for parameters in sent:  # the batch sends the hash of the file it wrote
        body = storage.get(parameters["chunk_key"])
        assert parameters["requests_sha256"] == hashlib.sha256(body).hexdigest()
    assert report.counts["SUCCESS"] == 2 and report.counts["ERROR"] == 2
    assert report.manifest_uri and Path(report.manifest_uri).is_file()
    manifest = [json.loads(x) for x in Path(report.manifest_uri).read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == prompts
    for record in manifest:
        if record["finish_reason"] == "SUCCESS":
            assert Path(record["uri"]).is_file()
        else:
            assert record["uri"] is None and "does not exist" in record["error"]
    assert stranger.cache_key not in {m["cache_key"] for m in manifest}
    assert report.api_calls == 4  # what the results file says was spent, verified or not
    assert flow_env.stats.generations == 0


def test_a_batch_whose_requests_file_is_swapped_pays_nothing(
    tmp_path: Path, flow_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk file is swapped between the batch writing it and its run reading it; the real
    render-chunk flow (in this process, not on a pool) refuses it; the batch records why."""
    destination = str(tmp_path / "dest")
    storage = open_storage(destination)
    swapped = planned(6, prompt="paid for by nobody's plan")

    def swapping_run(parameters: dict[str, Any]) -> Any:
        write_requests_at(storage, parameters["chunk_key"], swapped)
        return render_chunk(**{**parameters, "in_flight": None}, return_state=True)

    prompts = [f"a planned lantern {i}" for i in range(3)]
    report, sent = run_batch_on_fake_pool(monkeypatch, destination, prompts, swapping_run)
    assert len(sent) == 2
    assert report.counts["ERROR"] == 3 and report.counts["SUCCESS"] == 0
    for record in report.records:
        assert "not the one the batch wrote" in (record.error or "")
        assert "/chunks/chunk-0000" in (record.error or "")
    assert report.manifest_uri and Path(report.manifest_uri).is_file()
    assert flow_env.stats.generations == 0


def write_requests_at(storage: Storage, key: str, images: Sequence[PlannedImage]) -> None:
    body = b"".join(p.request.model_dump_json().encode() + b"\n" for p in images)
    storage.put(key, body, content_type=NDJSON)
