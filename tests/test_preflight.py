"""`preflight`: each check a run makes before it spends anything, and the error that names it.

One thing is wrong per test (a file where a folder must be: the tests run as root, so
permission bits prove nothing); everything checked before it is fine, so the error seen is that
check's. The Prefect objects (limits, deployments) are read from the session's real API.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flux_flows.errors import MissingCredentialsError, StorageError
from flux_flows.rendering.preflight import check_chunk_deployment, preflight
from flux_flows.rendering.spill import SpillFolder
from flux_flows.settings import BatchOptions
from flux_flows.storage import Storage, open_storage
from helpers.common import TEST_API_KEY


@pytest.fixture
def dest(tmp_path: Path) -> Storage:
    return open_storage(str(tmp_path / "dest"))


@pytest.fixture
def spill(tmp_path: Path) -> SpillFolder:
    return SpillFolder(str(tmp_path / "dest"), tmp_path / "spill")


@pytest.fixture
def with_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIREWORKS_API_KEY", TEST_API_KEY)


def blocked(tmp_path: Path, name: str) -> Path:
    """A path under a plain file: nothing can be created there, whoever asks."""
    blocker = tmp_path / f"{name}-is-a-file"
    blocker.write_text("a file where a folder should be")
    return blocker / name


def test_everything_in_order_passes(
    tmp_path: Path, dest: Storage, spill: SpillFolder, with_key: None
) -> None:
    preflight(BatchOptions(), dest, spill)
    assert spill.path.is_dir()  # the spill folder is made at once, not at the first failure
    assert list((tmp_path / "dest" / "claims").iterdir()) == []  # the probe is removed


def test_an_unwritable_destination_is_named(tmp_path: Path, spill: SpillFolder) -> None:
    where = blocked(tmp_path, "dest")
    with pytest.raises(StorageError, match="not writable") as info:
        preflight(BatchOptions(), open_storage(str(where)), spill)
    assert str(where) in str(info.value)


def test_an_unwritable_claims_folder_is_named(
    tmp_path: Path, dest: Storage, spill: SpillFolder
) -> None:
    root = tmp_path / "dest"
    root.mkdir(parents=True)
    (root / "claims").write_text("not a folder")
    with pytest.raises(StorageError, match="claims") as info:
        preflight(BatchOptions(), dest, spill)
    assert "coordinate so that none pays twice" in str(info.value)


def test_an_unwritable_spill_folder_is_named(tmp_path: Path, dest: Storage) -> None:
    spill = SpillFolder(str(tmp_path / "dest"), blocked(tmp_path, "spill"))
    with pytest.raises(StorageError, match="spill folder") as info:
        preflight(BatchOptions(), dest, spill)
    assert "FLUX_FLOWS_SPILL_DIR" in str(info.value) or "spill_dir" in str(info.value)


def test_a_missing_key_is_found_before_any_request(dest: Storage, spill: SpillFolder) -> None:
    with pytest.raises(MissingCredentialsError):
        preflight(BatchOptions(), dest, spill)


def test_a_dry_run_checks_only_what_it_reads(tmp_path: Path) -> None:
    """No key, an unwritable destination and spill folder: a dry run writes none of them."""
    where = str(blocked(tmp_path, "dest"))
    spill = SpillFolder(where, blocked(tmp_path, "spill"))
    options = BatchOptions(dry_run=True, concurrency_limit="no-such-limit")
    preflight(options, open_storage(where), spill)


# --------------------------------------------------------------------------------------------
# The checks that read the Prefect API
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_api", "with_key")
@pytest.mark.parametrize(
    ("option", "name", "fragments"),
    [
        ("concurrency_limit", "no-such-limit", ["no-such-limit", "prefect gcl create"]),
        ("rate_limit", "no-such-rate", ["no-such-rate"]),
        ("chunk_deployment", "render-chunk/nowhere", ["no such deployment", "prefect.yaml"]),
    ],
)
def test_a_missing_prefect_object_is_named_with_what_to_do(
    dest: Storage, spill: SpillFolder, option: str, name: str, fragments: list[str]
) -> None:
    with pytest.raises(ValueError) as info:
        preflight(BatchOptions(**{option: name}), dest, spill)
    message = str(info.value)
    assert f"{name!r}" in message and all(f in message for f in fragments), message
    assert "nothing was generated" in message


@pytest.mark.usefixtures("prefect_api")
def test_a_deployment_of_another_flow_is_refused_as_the_chunk_deployment() -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="not-render-chunk")
    def other() -> None:
        return None

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(other)
        client.create_deployment(flow_id, "elsewhere", entrypoint="somewhere.py:other")
    with pytest.raises(ValueError) as info:
        check_chunk_deployment("not-render-chunk/elsewhere")
    message = str(info.value)
    assert "'somewhere.py:other'" in message and "not the render-chunk flow" in message
