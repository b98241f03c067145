"""FireworksCredentials as a Prefect block: saved, loaded, registered, and never showing the key."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_API_KEY
from flux_flows import FinishReason, FireworksCredentials, ImageRequest, generate_images


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
