"""A contact sheet for an earlier run's manifest (`flux-flows gallery`), written locally."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flux_flows.errors import StorageError
from flux_flows.gallery.index import SheetText
from flux_flows.gallery.links import Href, local_href, object_key_of, relative_href, signed_href
from flux_flows.gallery.sheets import write_sheet
from flux_flows.models import FinishReason
from flux_flows.planning import layout
from flux_flows.records.manifests import destination_of_manifest, load_manifest
from flux_flows.records.reports import count_outcomes, summary_lines
from flux_flows.results import BatchReport, ImageRecord
from flux_flows.storage import LocalStorage, Storage, is_s3_uri, open_storage

DEFAULT_GALLERY_DIR = "flux-flows-gallery"
GALLERY_PAGE = "index.html"
DEFAULT_EXPIRES_S = 24 * 3600
MAX_EXPIRES_S = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
DOWNLOAD_WORKERS = 16

_UNKNOWN_FROM_MANIFEST = {"wall time", "saved by the cache"}


def manifest_summary(records: Sequence[ImageRecord], manifest_uri: str) -> list[tuple[str, str]]:
    """The run's summary rebuilt from its manifest; lines a manifest cannot tell are left out."""
    report = BatchReport(
        records=list(records),
        counts=count_outcomes(records),
        api_calls=sum(r.api_calls for r in records),
        cache_hits=sum(1 for r in records if r.cached),
        manifest_uri=manifest_uri,
        destination=destination_of_manifest(manifest_uri),
        estimated_cost_usd=sum(r.estimated_cost_usd for r in records),
    )
    return [line for line in summary_lines(report) if line[0] not in _UNKNOWN_FROM_MANIFEST]


@dataclass(frozen=True)
class GalleryPage:
    """Where `build_gallery` wrote the index, how many thumbnails it copied beside it, and how
    many pages of cards the index leads to (1: the index is the page)."""

    path: Path
    downloaded: int = 0
    missing: int = 0
    pages: int = 1


def _check_expiry(expires_s: int) -> None:
    if not 1 <= expires_s <= MAX_EXPIRES_S:
        raise ValueError(
            f"--expires must be between 1 and {MAX_EXPIRES_S} seconds (7 days, the most S3 "
            f"allows for a signed link), got {expires_s}"
        )


def _page_path(manifest_uri: str, out_dir: str | os.PathLike[str] | None, is_s3: bool) -> Path:
    if out_dir is not None:
        return Path(out_dir).expanduser().absolute() / GALLERY_PAGE
    if is_s3:
        return Path(DEFAULT_GALLERY_DIR).absolute() / GALLERY_PAGE
    return Path(manifest_uri).expanduser().absolute().parent / layout.CONTACT_SHEET


def _download_thumbnails(
    storage: Storage, records: Iterable[ImageRecord], folder: Path
) -> tuple[set[str], int]:
    """Copy every thumbnail the records name into `folder`/thumbs; returns (copied keys, missing).

    A missing thumbnail is not an error: its card falls back to the full image.
    """
    keys = {
        key
        for r in records
        if r.finish_reason is FinishReason.SUCCESS and (key := object_key_of(r.thumbnail_uri))
    }

    def fetch(key: str) -> str | None:
        try:
            data = storage.get(key)
        except StorageError:
            return None
        target = folder.joinpath(*key.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return key

    with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
        copied = {key for key in pool.map(fetch, sorted(keys)) if key}
    return copied, len(keys) - len(copied)


def _links_to(storage: Storage, sheet_dir: Path, expires_s: int) -> Callable[[str], Href]:
    """For a page at a key under `sheet_dir`: file links to a local destination, else signed."""
    if isinstance(storage, LocalStorage):
        root = storage.root
        return lambda page_key: local_href(root, sheet_dir.joinpath(*page_key.split("/")).parent)
    signed = signed_href(storage, expires_s)
    return lambda _page_key: signed


def _prefer_copies(copied: set[str], fallback: Callable[[str], Href]) -> Callable[[str], Href]:
    """Relative links to the copies beside the sheet; `fallback` for everything else."""

    def href_for(page_key: str) -> Href:
        here, elsewhere = relative_href(page_key), fallback(page_key)
        return lambda key: here(key) if key in copied else elsewhere(key)

    return href_for


def build_gallery(
    manifest_uri: str,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    expires_s: int = DEFAULT_EXPIRES_S,
    aws_credentials: Any = None,
) -> GalleryPage:
    """Write a contact sheet for an earlier run's manifest; returns where its index is.

    A local manifest's sheet goes beside it (or into `out_dir`/index.html) with relative links
    to the destination's files. An S3 manifest's sheet is written locally
    (./flux-flows-gallery/index.html by default) with signed links valid for `expires_s`; with
    `download`, the thumbnails are copied beside the sheet and linked relatively, so the grid
    keeps working after the links expire. A big run is paged as a run's own sheet is, with the
    pages in a `contact-sheet/` folder beside the index.
    """
    _check_expiry(expires_s)
    is_s3 = is_s3_uri(manifest_uri)
    records = load_manifest(manifest_uri, aws_credentials=aws_credentials)
    storage = open_storage(destination_of_manifest(manifest_uri), aws_credentials=aws_credentials)
    page = _page_path(manifest_uri, out_dir, is_s3)
    page.parent.mkdir(parents=True, exist_ok=True)
    href_for = _links_to(storage, page.parent, expires_s)
    notes: list[str] = []
    if not isinstance(storage, LocalStorage):
        until = (datetime.now(UTC) + timedelta(seconds=expires_s)).strftime("%Y-%m-%d %H:%M UTC")
        notes.append(
            f"Links to S3 are signed and expire at {until}: run `flux-flows gallery` again "
            "for fresh ones."
        )
    copied: set[str] = set()
    missing = 0
    if download:
        copied, missing = _download_thumbnails(storage, records, page.parent)
        href_for = _prefer_copies(copied, href_for)
    written = write_sheet(
        LocalStorage(page.parent),
        [page.name],
        records,
        count_outcomes(records),
        href_for=href_for,
        text=SheetText(
            title=f"flux-flows gallery: {manifest_uri.rsplit('/', 1)[-1]}",
            subtitle=manifest_uri,
            summary=manifest_summary(records, manifest_uri),
            notes=notes,
            manifest_href=None if is_s3 else local_manifest_href(manifest_uri, page.parent),
        ),
    )
    return GalleryPage(page, downloaded=len(copied), missing=missing, pages=written.pages)


def local_manifest_href(manifest_uri: str, page_dir: Path) -> str:
    manifest = Path(manifest_uri).expanduser().absolute()
    return local_href(manifest.parent, page_dir)(manifest.name)
