"""FireworksCredentials as a Prefect block: saved, loaded, registered, and never showing the key."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from flux_flows import (
    APIConnectionError,
    FinishReason,
    FireworksCredentials,
    ImageRequest,
    InvalidRequestError,
    RetryPolicy,
    generate_images,
)
from flux_flows.blocks import shared_client
from flux_flows.client import DEFAULT_BASE_URL
from helpers.common import TEST_API_KEY


def test_block_saves_loads_and_builds_a_working_client(prefect_api: None, emulator: Any) -> None:
    FireworksCredentials(api_key=TEST_API_KEY, base_url=emulator.base_url).save(
        "test-fireworks", overwrite=True
    )
    loaded = FireworksCredentials.load("test-fireworks")
    assert loaded.api_key.get_secret_value() == TEST_API_KEY
    assert TEST_API_KEY not in repr(loaded) and TEST_API_KEY not in str(loaded.model_dump())
    with loaded.get_client() as client:
        image = client.generate(ImageRequest(prompt="from a block"))
    assert image.finish_reason is FinishReason.SUCCESS
    assert emulator.stats.generations == 1


def test_flow_uses_the_block_instead_of_env(
    prefect_api: None, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)
    monkeypatch.setenv("FIREWORKS_BASE_URL", "http://127.0.0.1:9/not-used")
    credentials = FireworksCredentials(api_key=TEST_API_KEY, base_url=emulator.base_url)
    report = generate_images(["block fox"], str(tmp_path), credentials=credentials)
    assert report.counts["SUCCESS"] == 1 and emulator.stats.generations == 1


def test_collection_entry_point_registers_the_block() -> None:
    from prefect.blocks.core import Block
    from prefect.utilities.dispatch import lookup_type

    (entry,) = [ep for ep in entry_points(group="prefect.collections") if ep.name == "flux_flows"]
    entry.load()  # what Prefect does to register a collection's blocks
    assert lookup_type(Block, "fireworks-credentials") is FireworksCredentials
    assert FireworksCredentials.get_block_type_slug() == "fireworks-credentials"
    schema = FireworksCredentials.model_json_schema()
    assert schema["properties"]["api_key"].get("format") == "password"


# --- base_url: unset means FIREWORKS_BASE_URL, else the public API; an explicit value wins ---


def test_unset_base_url_follows_the_env_where_the_client_is_built(
    emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIREWORKS_BASE_URL", emulator.base_url)
    credentials = FireworksCredentials(api_key=TEST_API_KEY)
    assert credentials.base_url is None
    with credentials.get_client() as client:
        assert client.base_url == emulator.base_url
        image = client.generate(ImageRequest(prompt="env block fox"))
    assert image.finish_reason is FinishReason.SUCCESS and emulator.stats.generations == 1
    assert shared_client(credentials).base_url == emulator.base_url


def test_an_explicit_base_url_wins_over_the_env(
    emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIREWORKS_BASE_URL", "http://127.0.0.1:9/not-used")
    credentials = FireworksCredentials(api_key=TEST_API_KEY, base_url=emulator.base_url)
    with credentials.get_client() as client:
        assert client.base_url == emulator.base_url
        client.generate(ImageRequest(prompt="explicit block fox"))
    assert emulator.stats.generations == 1
    assert shared_client(credentials).base_url == emulator.base_url


def test_without_env_or_value_the_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the client is built: no request is sent."""
    monkeypatch.delenv("FIREWORKS_BASE_URL", raising=False)
    credentials = FireworksCredentials(api_key=TEST_API_KEY)
    with credentials.get_client() as client:
        assert client.base_url == DEFAULT_BASE_URL == "https://api.fireworks.ai/inference/v1"
    assert credentials.resolved_base_url() == DEFAULT_BASE_URL


def test_the_saved_block_keeps_base_url_unset(
    prefect_api: None, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving stores no env value: the block resolves it on each machine that loads it."""
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("FIREWORKS_BASE_URL", "http://127.0.0.1:9/where-it-was-saved")
    FireworksCredentials(api_key=TEST_API_KEY).save("test-unset-base-url", overwrite=True)
    with get_client(sync_client=True) as prefect:
        document = prefect.read_block_document_by_name(
            "test-unset-base-url", block_type_slug="fireworks-credentials"
        )
    assert document.data.get("base_url") is None
    monkeypatch.setenv("FIREWORKS_BASE_URL", emulator.base_url)  # where it is loaded
    loaded = FireworksCredentials.load("test-unset-base-url")
    assert loaded.base_url is None
    with loaded.get_client() as client:
        assert client.base_url == emulator.base_url
        client.generate(ImageRequest(prompt="loaded elsewhere"))
    assert emulator.stats.generations == 1


def test_errors_name_the_base_url_actually_used(
    emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIREWORKS_BASE_URL", "http://127.0.0.1:9/env-not-used")
    unreachable = FireworksCredentials(
        api_key=TEST_API_KEY, base_url="http://user:pw@127.0.0.1:9/block/v1"
    )
    with (
        unreachable.get_client(retry=RetryPolicy(max_retries=0)) as client,
        pytest.raises(APIConnectionError) as refused,
    ):
        client.generate(ImageRequest(prompt="x"))
    assert "http://127.0.0.1:9/block/v1" in str(refused.value)
    assert "env-not-used" not in str(refused.value) and "pw" not in str(refused.value)

    wrong_path = FireworksCredentials(api_key=TEST_API_KEY, base_url=emulator.base_url + "/nope")
    with (
        wrong_path.get_client(retry=RetryPolicy(max_retries=0)) as client,
        pytest.raises(InvalidRequestError) as missing,
    ):
        client.generate(ImageRequest(prompt="x"))
    assert missing.value.status_code == 404
    assert f"({emulator.base_url}/nope)" in str(missing.value)
