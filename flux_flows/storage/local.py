"""A local folder as storage, and the file operations the spill folder shares with it.

Writes are atomic (a killed process never leaves half an image) and failures become a
`StorageError` naming the path, like S3's, so the flow handles both destinations the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from flux_flows.errors import StorageError
from flux_flows.storage.base import (
    IsAFolderError,
    Metadata,
    NotFoundError,
    ReadError,
    TooLargeError,
    check_key,
)

__all__ = ["LocalStorage", "list_folder", "probe_writable", "read_file", "write_atomically"]

# Temp files of an in-flight (or killed) `put`: hidden, unique, never listed as keys.
_TEMP_SUFFIX = ".flux-tmp"
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{32}" + re.escape(_TEMP_SUFFIX) + "$")


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o666) -> None:
    """Temp file beside the target, fsync, then `os.replace`: a killed process leaves either the
    old file or the new one, never half an image. Leftover temp files end in `_TEMP_SUFFIX`.
    `mode` is the new file's (before the umask): the spill folder's files are 0600 from birth.

    Plain `os.path` strings, not `pathlib`: this runs per image, and Python 3.11's pathlib
    interns every path segment it parses (CPU, and an interned-string table that only grows).
    """
    folder, name = os.path.split(os.fspath(path))
    temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def probe_writable(folder: Path) -> None:
    """Create the folder and a probe file: permission bits alone do not prove writability."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-probe.{uuid.uuid4().hex}{_TEMP_SUFFIX}"
    probe.write_bytes(b"")
    probe.unlink()


def _reason(exc: OSError) -> str:
    return str(exc.strerror or exc)


def read_file(path: Path, *, max_bytes: int | None = None, head: int | None = None) -> bytes:
    """A regular file's bytes (or its first `head` bytes); over `max_bytes` it is refused.

    Devices, pipes and sockets are refused before they are opened: a prompt file naming
    /dev/zero (or a link to it) must not read until memory runs out, nor a FIFO block forever.
    """
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ReadError(
                f"could not read {path}: not a regular file", reason="not a regular file"
            )
        if max_bytes is not None and info.st_size > max_bytes:
            raise TooLargeError(
                f"{path} is {info.st_size} bytes, over the limit of {max_bytes}",
                size=info.st_size,
            )
        with path.open("rb") as handle:
            if head is not None:
                return handle.read(head)
            data = handle.read(-1 if max_bytes is None else max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:  # it grew since the stat
            raise TooLargeError(f"{path} is over the limit of {max_bytes}", size=len(data))
        return data
    except FileNotFoundError as exc:
        raise NotFoundError(f"no file at {path}: check the key", reason=_reason(exc)) from exc
    except IsADirectoryError as exc:
        raise IsAFolderError(f"could not read {path}: {_reason(exc)}", reason=_reason(exc)) from exc
    except OSError as exc:
        raise ReadError(f"could not read {path}: {_reason(exc)}", reason=_reason(exc)) from exc


def iter_file_lines(path: Path) -> Iterator[bytes]:
    """A regular file's lines, read as a stream."""
    read_file(path, head=0)  # the same refusals (missing, folder, device) with the same errors
    try:
        with path.open("rb") as handle:
            yield from handle
    except OSError as exc:
        raise ReadError(f"could not read {path}: {_reason(exc)}", reason=_reason(exc)) from exc


def list_folder(folder: Path) -> list[str]:
    """The files directly in `folder` (not in its subfolders), as absolute paths, sorted."""
    folder = folder.absolute()
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotFoundError(f"no folder at {folder}", reason=_reason(exc)) from exc
    except OSError as exc:
        raise ReadError(f"could not list {folder}: {_reason(exc)}", reason=_reason(exc)) from exc
    return [str(path) for path in entries if path.is_file()]


class LocalStorage:
    """Files under an absolute folder. Metadata is not kept: the manifest holds it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # One spelling per folder ("a/../b/", "./b" and "b" alike): the spill folder is keyed on it.
        self.root = Path(os.path.normpath(Path(root).expanduser().absolute()))
        self.root_uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.root_uri!r})"

    def _path(self, key: str) -> Path:
        return Path(self.uri_for(key))

    def uri_for(self, key: str) -> str:
        """The file's absolute path, joined as a string (see `write_atomically`)."""
        return os.path.join(self.root_uri, *check_key(key).split("/"))

    def list_keys(self, prefix: str = "") -> set[str]:
        """Walk only the folder the prefix points into, so listing `thumbs/` skips `images/`."""
        directory, _, _ = prefix.rpartition("/")
        folder = self._path(directory) if directory else self.root
        keys: set[str] = set()
        for dirpath, _dirnames, filenames in os.walk(folder):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if _TEMP_RE.match(name):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.add(key)
        return keys

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, key: str, data: bytes, *, content_type: str, metadata: Metadata = None) -> str:
        """Write to a temp file beside the target, fsync, then `os.replace`.

        A killed process leaves either the old file or the new one, never half an image; a
        leftover temp file is ignored by `list_keys`. `content_type` and `metadata` are accepted
        for interface parity; the manifest records them.
        """
        path = self.uri_for(key)
        try:
            write_atomically(path, data)
        except OSError as exc:
            raise StorageError(f"could not write {path}: {_reason(exc)}") from exc
        return path

    def put_file(self, key: str, path: Path, *, content_type: str) -> str:
        """Copy a file in, atomically (temp file, then rename), without reading it whole."""
        target = self._path(key)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, temp)
            os.replace(temp, target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StorageError(f"could not write {target}: {_reason(exc)}") from exc
        return str(target)

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return read_file(self._path(key), max_bytes=max_bytes)

    def create(self, key: str, data: bytes, *, content_type: str) -> bool:
        """Write `key` only if nothing is there, atomically: True if this call created it.

        The bytes go to a temp file first and are then hard-linked into place, so no reader
        ever sees a half-written object and exactly one of two racing writers wins (`link`
        fails with EEXIST for the other, on a local disk and on NFS alike).
        """
        path = self.uri_for(key)
        folder, name = os.path.split(path)
        temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(temp, "xb") as handle:
                handle.write(data)
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"could not write {path}: {_reason(exc)}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        return True

    def age_s(self, key: str) -> float | None:
        """Seconds since `key` was last written, by the file system's own clock (None: absent).

        "Now" is the mtime of a probe file written beside it, so writers on other machines
        sharing this disk (NFS sets mtimes from the server's clock) are judged on one clock.
        """
        path = self._path(key)
        try:
            written = path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"could not check {path}: {_reason(exc)}") from exc
        probe = path.parent / f".clock.{uuid.uuid4().hex}{_TEMP_SUFFIX}"
        try:
            probe.write_bytes(b"")
            now = probe.stat().st_mtime
        except OSError as exc:
            raise StorageError(f"could not write in {path.parent}: {_reason(exc)}") from exc
        finally:
            probe.unlink(missing_ok=True)
        return max(0.0, now - written)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"could not delete {self._path(key)}: {_reason(exc)}") from exc

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return None

    def check_writable(self) -> None:
        """Create the folder and a probe file: permission bits alone do not prove writability."""
        try:
            probe_writable(self.root)
        except OSError as exc:
            raise StorageError(
                f"local folder {self.root} is not writable ({_reason(exc)}): choose "
                "another destination or fix its permissions"
            ) from exc
