"""A run's manifest, streamed: parts as the work finishes, then the whole, never all in memory.

While a run renders, each batch of finished images (a chunk, or a few hundred on threads) is
written as `runs/<id>/parts/part-NNNNN.jsonl`: a run killed half way keeps the records of what it
finished. At the end the manifest is written line by line to a local spool file in plan order and
uploaded from there (`runs/<id>/manifest.jsonl`, then the root `manifest.jsonl`), while a tally
keeps the counts, totals and the first failures the report needs; the parts are then removed.

The one home of manifests: writing, assembling, reading (the line format itself lives with
`ImageRecord` in `results`, which streams a report's records from its manifest).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from flux_flows.errors import StorageError
from flux_flows.models import FinishReason
from flux_flows.planning import layout
from flux_flows.results import FIRST_ERRORS, ImageRecord, iter_manifest, parse_manifest_lines
from flux_flows.storage import (
    IsAFolderError,
    NotFoundError,
    ReadError,
    Storage,
    is_s3_uri,
    read_uri,
    split_s3_uri,
)

NDJSON = "application/x-ndjson"
KEEP_IN_MEMORY = 1_000  # a small run's report holds its records; a big one streams them


def _line(record: ImageRecord) -> bytes:
    return record.model_dump_json().encode("utf-8") + b"\n"


class PartWriter:
    """Writes the records of finished images as numbered parts under runs/<id>/parts/."""

    def __init__(self, storage: Storage, run_id: str) -> None:
        self.storage = storage
        self.prefix = f"{layout.RUNS}{run_id}/parts/"
        self.keys: list[str] = []

    def write(self, records: Iterable[ImageRecord]) -> None:
        body = b"".join(_line(r) for r in records)
        if not body:
            return
        key = f"{self.prefix}part-{len(self.keys) + 1:05d}.jsonl"
        self.storage.put(key, body, content_type=NDJSON)
        self.keys.append(key)

    def remove(self) -> None:
        """The parts are in the whole manifest now; a failed delete only leaves a copy behind."""
        for key in self.keys:
            with contextlib.suppress(StorageError, OSError):
                self.storage.delete(key)


class ManifestSpool:
    """The whole manifest on local disk, line by line, and what the report needs from it."""

    def __init__(self, *, keep_all: bool = False) -> None:
        self.keep_all = keep_all  # a dry run stores no manifest: its report must hold them
        self._file: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            prefix="flux-flows-manifest-", suffix=".jsonl", delete=False
        )
        self.path = Path(self._file.name)
        self.requested = 0
        self.counts: Counter[str] = Counter()
        self.api_calls = 0
        self.cache_hits = 0
        self.cached_successes = 0
        self.spilled = 0
        self.cost_usd = 0.0
        self.first_errors: list[ImageRecord] = []
        self.kept: list[ImageRecord] | None = []

    def add(self, record: ImageRecord) -> None:
        self._file.write(_line(record))
        self.requested += 1
        self.counts[record.finish_reason.value] += 1
        self.api_calls += record.api_calls
        self.cache_hits += record.cached
        self.cached_successes += record.cached and record.finish_reason is FinishReason.SUCCESS
        self.spilled += bool(record.spill_path)
        if record.finish_reason is not FinishReason.SKIPPED_BUDGET:
            self.cost_usd += record.estimated_cost_usd
        if record.finish_reason is FinishReason.ERROR and len(self.first_errors) < FIRST_ERRORS:
            self.first_errors.append(record)
        if self.kept is not None:
            self.kept.append(record)
            if len(self.kept) > KEEP_IN_MEMORY and not self.keep_all:
                self.kept = None

    def finish(self) -> None:
        self._file.close()

    def all_counts(self) -> dict[str, int]:
        return {reason.value: self.counts.get(reason.value, 0) for reason in FinishReason}

    def store(self, storage: Storage, run_id: str, *, latest: Path | None = None) -> str:
        """The run's manifest and the destination's latest (this one, or `latest` for a replay
        merged into its original); returns the run's URI."""
        uri = storage.put_file(layout.run_manifest_key(run_id), self.path, content_type=NDJSON)
        storage.put_file(layout.MANIFEST, latest or self.path, content_type=NDJSON)
        return uri

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def merged_manifest(
    base_uri: str | None, replayed: Path, aws_credentials: Any
) -> ManifestSpool | None:
    """The manifest at `base_uri` with each replayed record in place of the one it re-did
    (matched by index and variant), streamed into a spool; None when there is no base."""
    if not base_uri:
        return None
    redone = {(r.index, r.variant): r for r in iter_manifest(str(replayed))}
    merged = ManifestSpool()
    try:
        for record in iter_manifest(base_uri, aws_credentials=aws_credentials):
            merged.add(redone.get((record.index, record.variant), record))
    finally:
        merged.finish()
    return merged


def manifest_bytes(records: Sequence[ImageRecord]) -> bytes:
    """JSONL, one line per requested image, whole prompts: what a downstream DAG reads."""
    return b"".join(r.model_dump_json().encode("utf-8") + b"\n" for r in records)


def read_manifest(data: bytes, source: str) -> list[ImageRecord]:
    return list(parse_manifest_lines(data.splitlines(), source))


def write_manifests(storage: Storage, run_id: str, records: Sequence[ImageRecord]) -> str:
    """The run's own manifest under runs/<id>/, and a copy at the root for "the latest run"."""
    body = manifest_bytes(records)
    uri = storage.put(layout.run_manifest_key(run_id), body, content_type="application/x-ndjson")
    storage.put(layout.MANIFEST, body, content_type="application/x-ndjson")
    return uri


def load_manifest(uri: str, *, aws_credentials: Any = None) -> list[ImageRecord]:
    """An earlier run's manifest, from a local path or s3://bucket/key."""
    if is_s3_uri(uri) and not all(split_s3_uri(uri)):
        raise ValueError(f"{uri}: a manifest URI must name an object, s3://BUCKET/KEY")
    try:
        data = read_uri(uri, aws_credentials=aws_credentials, action="read the manifest")
    except (NotFoundError, IsAFolderError) as exc:
        raise ValueError(f"manifest {uri} does not exist (or is not a file)") from exc
    except ReadError as exc:
        raise ValueError(f"cannot read manifest {uri}: {exc.reason}") from exc
    return read_manifest(data, uri)


def destination_of_manifest(uri: str) -> str:
    """The destination a manifest was written into: <dest>/manifest.jsonl or <dest>/runs/<id>/..."""
    parent = uri.rsplit("/", 1)[0] if "/" in uri else "."
    parts = parent.rsplit("/", 2)
    if len(parts) == 3 and parts[1] + "/" == layout.RUNS:
        return parts[0]
    return parent
