"""The spill folder holds paid-for images: folders 0700, files 0600, whatever the umask, and a
folder of ours found looser is tightened (issue 28, item 6)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_flows.rendering.spill import SpillFolder


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The most permissive umask a user could have: nothing masked."""
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME, and no FLUX_FLOWS_SPILL_DIR: the default root ~/.flux-flows/spill."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLUX_FLOWS_SPILL_DIR", raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def _spill_one(spill: SpillFolder) -> Path:
    return spill.save("k" * 64, b"paid-for bytes", object_key="a/b.jpg", content_type="image/jpeg")


def test_the_default_folders_and_files_are_private(home: Path, loose_umask: None) -> None:
    spill = SpillFolder("s3://bucket/prefix")
    assert spill.root == (home / ".flux-flows" / "spill").resolve()
    spill.check_writable()
    data = _spill_one(spill)
    for folder in (home / ".flux-flows", spill.root, spill.path):
        assert mode(folder) == 0o700, folder
    assert data.parent == spill.path
    assert sorted(p.name for p in spill.path.iterdir()) == [f"{'k' * 64}.bin", f"{'k' * 64}.json"]
    for file in spill.path.iterdir():
        assert mode(file) == 0o600, file
    loaded = spill.load("k" * 64)
    assert loaded is not None and loaded[0] == b"paid-for bytes"


def test_a_kept_manifest_is_private(home: Path, loose_umask: None, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"prompt": "x"}\n')
    manifest.chmod(0o644)
    kept = SpillFolder("/some/destination").keep_manifest("run-1", manifest)
    assert kept.read_text() == '{"prompt": "x"}\n'
    assert mode(kept) == 0o600
    assert mode(kept.parent) == 0o700


def test_loose_folders_of_ours_are_tightened(home: Path) -> None:
    """What earlier versions left: 0755 everywhere (and a group-writable one)."""
    spill = SpillFolder("s3://bucket/prefix")
    spill.path.mkdir(parents=True)
    for folder, loose in ((home / ".flux-flows", 0o755), (spill.root, 0o775), (spill.path, 0o755)):
        folder.chmod(loose)
    _spill_one(spill)
    for folder in (home / ".flux-flows", spill.root, spill.path):
        assert mode(folder) == 0o700, folder


def test_home_is_never_touched(home: Path) -> None:
    """HOME is the user's business: only ~/.flux-flows and below are made private."""
    home.chmod(0o755)
    SpillFolder("s3://bucket/prefix").check_writable()
    assert mode(home) == 0o755


def test_a_chosen_root_is_created_private_with_its_missing_parents(
    tmp_path: Path, loose_umask: None
) -> None:
    root = tmp_path / "new" / "deeper" / "spill"
    spill = SpillFolder("/dest", root)
    spill.check_writable()
    for folder in (tmp_path / "new", tmp_path / "new" / "deeper", root, spill.path):
        assert mode(folder) == 0o700, folder


def test_a_folder_of_someone_else_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared root owned by another user keeps its bits; our own folder inside is 0700."""
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o755)
    monkeypatch.setattr(os, "getuid", lambda: root.stat().st_uid + 1)  # we are not its owner
    spill = SpillFolder("/dest", root)
    spill.check_writable()
    assert mode(root) == 0o755
    assert mode(spill.path) == 0o700  # created by us just now, so private from birth
