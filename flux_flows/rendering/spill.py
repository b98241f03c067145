"""The local spill folder: paid-for images that could not be stored yet wait here, never lost.

One folder per destination (named by a hash of its canonical root, so `/x`, `/x/` and `./x` or
`s3://b/p` and `s3://b/p/` share one), one file per cache key, plus a small JSON sidecar saying
where the bytes were going. A later run into the same destination uploads them without paying
again, and also finds images spilled under another spelling by earlier versions (by the
destination their sidecars name).

The images were paid for and may be private, so the folders are 0700 and the files 0600 (the
default root `~/.flux-flows/spill` and `~/.flux-flows` too), whatever the umask. A folder found
with looser bits is tightened when it belongs to this user; one that belongs to someone else is
left as it is (its per-destination folder inside is still 0700).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from flux_flows.errors import StorageError
from flux_flows.storage import probe_writable, write_atomically

SPILL_ENV = "FLUX_FLOWS_SPILL_DIR"
FOLDER_MODE = 0o700
FILE_MODE = 0o600


def _home_folder() -> Path:
    return Path.home() / ".flux-flows"


def default_spill_root() -> Path:
    return Path(os.environ.get(SPILL_ENV) or _home_folder() / "spill").expanduser()


def _tighten(folder: Path) -> None:
    """Take group and other bits off a folder of this user's (someone else's is left alone)."""
    try:
        info = folder.stat()
    except FileNotFoundError:
        return
    loose = stat.S_IMODE(info.st_mode) & ~FOLDER_MODE
    if loose and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
        os.chmod(folder, stat.S_IMODE(info.st_mode) & FOLDER_MODE)


def private_folder(folder: Path, *, tighten: tuple[Path, ...] = ()) -> None:
    """Create `folder` and any missing parent 0700 (chmod after mkdir: the umask may take owner
    bits, never add group ones), then tighten `folder` and the `tighten` folders if loose."""
    missing: list[Path] = []
    current = folder
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=FOLDER_MODE)
        except FileExistsError:  # made meanwhile by another run: tightened below if ours
            continue
        os.chmod(path, FOLDER_MODE)
    for path in (*tighten, folder):
        _tighten(path)


def canonical_destination(destination: str) -> str:
    """The one spelling of a destination: its storage's root URI (no trailing slash, absolute)."""
    from flux_flows.storage import open_storage

    try:
        return open_storage(destination).root_uri
    except (ValueError, StorageError):
        return destination


class SpillFolder:
    """Images awaiting upload to one destination (given as its canonical root URI)."""

    def __init__(self, destination: str, root: str | Path | None = None) -> None:
        digest = hashlib.sha256(destination.encode("utf-8")).hexdigest()[:16]
        self.root = Path(root or default_spill_root()).expanduser().resolve()
        self.path = self.root / digest
        self.destination = destination
        self._folders: list[Path] | None = None
        self._private: set[Path] = set()

    def _ensure_private(self, folder: Path) -> None:
        """`folder` exists, 0700, and so do the spill root and (for the default root) the
        ~/.flux-flows folder above it; checked once per folder and instance."""
        if folder in self._private and folder.is_dir():
            return
        home = _home_folder().expanduser().resolve()
        parents = (home, self.root) if self.root.is_relative_to(home) else (self.root,)
        private_folder(folder, tighten=parents)
        self._private.add(folder)

    def folders(self) -> list[Path]:
        """This destination's folder, then any folder an earlier spelling of it left behind."""
        if self._folders is None:
            self._folders = [self.path]
            if self.root.is_dir():
                for folder in sorted(self.root.iterdir()):
                    if folder != self.path and self._belongs_here(folder):
                        self._folders.append(folder)
        return self._folders

    def _belongs_here(self, folder: Path) -> bool:
        sidecar = next(folder.glob("*.json"), None) if folder.is_dir() else None
        if sidecar is None:
            return False
        try:
            named = json.loads(sidecar.read_text("utf-8")).get("destination")
        except (OSError, ValueError):
            return False
        return isinstance(named, str) and canonical_destination(named) == self.destination

    def data_path(self, cache_key: str) -> Path:
        return self._where(cache_key) / f"{cache_key}.bin"

    def _meta_path(self, cache_key: str) -> Path:
        return self._where(cache_key) / f"{cache_key}.json"

    def _where(self, cache_key: str) -> Path:
        """The folder holding this image (an earlier spelling's, if it is there), else ours."""
        for folder in self.folders():
            if (folder / f"{cache_key}.json").exists():
                return folder
        return self.path

    def save(
        self,
        cache_key: str,
        data: bytes,
        *,
        object_key: str,
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> Path:
        """Write bytes then sidecar, each atomically: a sidecar always means complete bytes."""
        target = self.data_path(cache_key)
        self._ensure_private(target.parent)
        write_atomically(target, data, mode=FILE_MODE)
        meta = {
            "destination": self.destination,
            "object_key": object_key,
            "content_type": content_type,
            "metadata": metadata or {},
        }
        meta_bytes = json.dumps(meta).encode("utf-8")
        write_atomically(self._meta_path(cache_key), meta_bytes, mode=FILE_MODE)
        return target

    def load(self, cache_key: str) -> tuple[bytes, dict[str, Any]] | None:
        meta_path = self._meta_path(cache_key)
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text("utf-8"))
        return self.data_path(cache_key).read_bytes(), meta

    def remove(self, cache_key: str) -> None:
        self._meta_path(cache_key).unlink(missing_ok=True)
        self.data_path(cache_key).unlink(missing_ok=True)

    def check_writable(self) -> None:
        """Fail before any spend if paid-for images could not be kept here when an upload fails."""
        try:
            self._ensure_private(self.path)
            probe_writable(self.path)
        except OSError as exc:
            raise StorageError(
                f"spill folder {self.path} is not writable ({exc.strerror or exc}): images whose "
                f"upload fails are kept there; set {SPILL_ENV} or spill_dir= to a writable folder"
            ) from exc

    def keep_manifest(self, run_id: str, manifest: Path) -> Path:
        """A run's manifest that could not be stored in the destination (copied, not read whole)."""
        target = self.path / f"manifest-{run_id}.jsonl"
        self._ensure_private(self.path)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb") as out, manifest.open("rb") as source:
            os.fchmod(out.fileno(), FILE_MODE)  # an older copy may have been looser
            shutil.copyfileobj(source, out)
        return target

    def cache_keys(self) -> set[str]:
        return {
            p.stem for folder in self.folders() if folder.is_dir() for p in folder.glob("*.json")
        }
