"""The contact sheet: one self-contained HTML page that shows what a run produced.

The page is written with the manifest (`runs/<id>/contact-sheet.html`, and a copy at the
destination root for the latest run) and can be rebuilt later from any manifest
(`flux-flows gallery`). It must work wherever it is opened, so it is built under constraints:

- No network: inline CSS and JS only, and a Content-Security-Policy that allows nothing else to
  run or load except images. A page opened from a folder or a static-site bucket works offline.
- Relative links, computed from the page's own location (`../../thumbs/...` from `runs/<id>/`),
  so the page works from a local folder and from a bucket served as a static site; signed URLs
  only when the page lives elsewhere (a local page over a private bucket).
- Every prompt and error is untrusted user text: everything goes through `html.escape`, the JS
  reads only `data-` attributes and text, and the CSP admits only the page's own two scripts (by
  hash), so even a missed escape could not run anything.
- 1,000 cards load fast: thumbnails (~5 KB) instead of images, `loading="lazy"`, and
  `content-visibility: auto` so off-screen cards are not laid out.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flux_flows import layout
from flux_flows.errors import StorageError
from flux_flows.models import FinishReason
from flux_flows.reporting import (
    count_outcomes,
    destination_of_manifest,
    load_manifest,
    summary_lines,
)
from flux_flows.results import BatchReport, ImageRecord
from flux_flows.storage import LocalStorage, Storage, is_s3_uri, open_storage
from flux_flows.thumbnails import thumbnail_size

HTML_CONTENT_TYPE = "text/html; charset=utf-8"
DEFAULT_GALLERY_DIR = "flux-flows-gallery"
GALLERY_PAGE = "index.html"
DEFAULT_EXPIRES_S = 24 * 3600
MAX_EXPIRES_S = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
DOWNLOAD_WORKERS = 16

# An object key this library writes: one folder of the layout, then a plain file name.
_OBJECT_KEY_RE = re.compile(r"^(?:images|filtered|thumbs)/[A-Za-z0-9._-]+$")

Href = Callable[[str], str | None]
"""How a page reaches an object: destination-relative key -> link (relative, file: or signed)."""

PLACEHOLDER_LABELS = {
    FinishReason.CONTENT_FILTERED: "Content filtered",
    FinishReason.ERROR: "Failed",
    FinishReason.SKIPPED_BUDGET: "Skipped: over budget",
    FinishReason.PLANNED: "Planned",
}

# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------


def object_key_of(uri: str | None) -> str | None:
    """The destination-relative key of an object this library stored, from its URI or path.

    Every image and thumbnail key is `<folder>/<file name>`, so the last two segments of the URI
    are the key whatever the destination's root, and also after the folder was moved. Anything
    else (a tampered manifest) gives None and is shown as "no preview", never linked.
    """
    if not uri:
        return None
    parts = uri.replace("\\", "/").rsplit("/", 2)
    if len(parts) < 3:
        return None
    key = f"{parts[-2]}/{parts[-1]}"
    return key if _OBJECT_KEY_RE.match(key) else None


def relative_href(page_key: str) -> Href:
    """Links from a page stored at `page_key` to objects of the same destination.

    The same relative link works on disk, over file:// and from a bucket served as a website.
    """
    base = posixpath.dirname(page_key) or "."

    def href(key: str) -> str:
        return quote(posixpath.relpath(key, base))

    return href


def local_href(root: Path, page_dir: Path) -> Href:
    """Links from a page in `page_dir` to the files of a local destination at `root`."""

    def href(key: str) -> str:
        target = root.joinpath(*key.split("/"))
        try:
            relative = os.path.relpath(target, page_dir)
        except ValueError:  # another drive on Windows: no relative path exists
            return target.as_uri()
        return quote(Path(relative).as_posix())

    return href


def signed_href(storage: Storage, expires_s: int) -> Href:
    """Presigned GET links, for a page that lives away from a private bucket."""
    return lambda key: storage.presigned_url(key, expires_s)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

_CSS = """
:root{color-scheme:light dark;--bg:#f6f6f4;--fg:#1d1d1f;--card:#fff;--muted:#6b6b70;
--line:#deded9;--ok:#1f7a3d;--warn:#9a5b00;--bad:#b3261e;--thumb:#ececea}
@media (prefers-color-scheme:dark){:root{--bg:#151517;--fg:#ececec;--card:#202024;
--muted:#a0a0a8;--line:#34343a;--ok:#6fd08c;--warn:#f0b45a;--bad:#ff8a80;--thumb:#2a2a2f}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;background:var(--bg);
color:var(--fg)}
header{padding:16px 20px 8px}
h1{font-size:20px;margin:0 0 4px}
.where{color:var(--muted);margin:0 0 8px;overflow-wrap:anywhere}
.summary{display:flex;flex-wrap:wrap;gap:4px 16px;margin:0;padding:0;list-style:none}
.summary b{font-weight:600}
.note{color:var(--warn);margin:8px 0 0}
.controls{position:sticky;top:0;z-index:1;display:flex;flex-wrap:wrap;gap:8px 16px;
align-items:center;padding:10px 20px;background:var(--bg);border-bottom:1px solid var(--line)}
.controls fieldset{border:0;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:4px 12px}
.controls legend{float:left;margin-right:8px;color:var(--muted)}
.controls input[type=search]{min-width:260px;padding:5px 8px;border:1px solid var(--line);
border-radius:6px;background:var(--card);color:var(--fg)}
.count{color:var(--muted)}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px;padding:16px 20px}
.card{display:flex;flex-direction:column;background:var(--card);border:1px solid var(--line);
border-radius:8px;overflow:hidden;content-visibility:auto;contain-intrinsic-size:auto 400px}
.card[hidden]{display:none}
.thumb{position:relative;display:flex;align-items:center;justify-content:center;
aspect-ratio:1;overflow:hidden;background:var(--thumb)}
.thumb img{position:absolute;inset:0;width:100%;height:100%;object-fit:contain}
.placeholder{flex-direction:column;gap:6px;padding:12px;text-align:center;font-weight:600}
.placeholder .why{font-weight:400;font-size:12px;color:var(--muted);overflow-wrap:anywhere;
max-height:8.5em;overflow:auto}
.r-CONTENT_FILTERED .placeholder{color:var(--warn)}
.r-ERROR .placeholder,.nostore .placeholder{color:var(--bad)}
.body{padding:8px 10px 10px;display:flex;flex-direction:column;gap:6px}
.prompt{margin:0;overflow-wrap:anywhere;display:-webkit-box;-webkit-box-orient:vertical;
-webkit-line-clamp:4;line-clamp:4;overflow:hidden}
.facts{margin:0;display:grid;grid-template-columns:auto 1fr;gap:0 8px;font-size:12px;
color:var(--muted)}
.facts dt{font-weight:600}.facts dd{margin:0;overflow-wrap:anywhere}
.badges{display:flex;flex-wrap:wrap;gap:4px}
.badge{font-size:11px;padding:1px 6px;border-radius:9px;border:1px solid currentColor}
.b-SUCCESS{color:var(--ok)}.b-CONTENT_FILTERED{color:var(--warn)}.b-ERROR{color:var(--bad)}
.b-SKIPPED_BUDGET,.b-PLANNED,.b-cached,.b-new{color:var(--muted)}
.empty{padding:40px 20px;color:var(--muted)}
"""

# Registered in <head>, before any <img> exists, so no load error can fire before it listens.
_FALLBACK_JS = """
document.addEventListener("error", (event) => {
  const img = event.target;
  if (img instanceof HTMLImageElement && img.dataset.full) {
    const full = img.dataset.full;
    delete img.dataset.full;
    img.src = full;
  }
}, true);
"""

_FILTER_JS = """
(() => {
  "use strict";
  const items = Array.from(document.querySelectorAll("main .card"), (card) => ({
    card, reason: card.dataset.reason, text: card.textContent.toLowerCase(),
  }));
  const boxes = Array.from(document.querySelectorAll("input[name=reason]"));
  const search = document.getElementById("search");
  const shown = document.getElementById("shown");
  const empty = document.getElementById("empty");
  function apply() {
    const wanted = new Set(boxes.filter((box) => box.checked).map((box) => box.value));
    const words = search.value.toLowerCase().split(/\\s+/).filter(Boolean);
    let count = 0;
    for (const item of items) {
      const visible = wanted.has(item.reason) && words.every((w) => item.text.includes(w));
      item.card.hidden = !visible;
      if (visible) count += 1;
    }
    shown.textContent = String(count);
    empty.hidden = count > 0;
  }
  for (const box of boxes) box.addEventListener("change", apply);
  search.addEventListener("input", apply);
  apply();
})();
"""


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


# Nothing but images may load, and only these exact scripts and styles may run: an injected
# <script>, inline handler or style attribute is refused by the browser even if escaping failed.
_CSP = "; ".join(
    [
        "default-src 'none'",
        "img-src * data: blob: file:",
        f"style-src {_csp_hash(_CSS)}",
        f"script-src {_csp_hash(_FALLBACK_JS)} {_csp_hash(_FILTER_JS)}",
        "base-uri 'none'",
        "form-action 'none'",
    ]
)


_BIDI_CONTROLS = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _e(value: object) -> str:
    """Escape for text and for double-quoted attribute values alike.

    Bidi controls are shown as `<U+202E>`, not obeyed: a right-to-left override in a prompt would
    otherwise make the page display text the prompt does not contain ("gpj.exe" as "exe.jpg").
    """
    text = _BIDI_CONTROLS.sub(lambda m: f"<U+{ord(m.group()):04X}>", str(value))
    return html.escape(text, quote=True)


@dataclass(frozen=True)
class _Card:
    record: ImageRecord
    src: str | None
    full: str | None


def _card_of(record: ImageRecord, href: Href) -> _Card:
    """Where a card's picture comes from: the thumbnail, else the full image, else nothing.

    Only SUCCESS records are ever shown as pictures; everything else is a placeholder.
    """
    if record.finish_reason is not FinishReason.SUCCESS:
        return _Card(record, None, None)
    image_key = object_key_of(record.uri)
    thumb_key = object_key_of(record.thumbnail_uri)
    full = href(image_key) if image_key else None
    thumb = href(thumb_key) if thumb_key else None
    return _Card(record, thumb or full, full)


def _picture(card: _Card) -> str:
    record = card.record
    if card.src is None:
        return _placeholder(record)
    width, height = thumbnail_size(record.width or 1024, record.height or 1024)
    fallback = f' data-full="{_e(card.full)}"' if card.full and card.full != card.src else ""
    image = (
        f'<img src="{_e(card.src)}"{fallback} alt="{_e(_alt(record.prompt))}" '
        f'width="{width}" height="{height}" loading="lazy" decoding="async">'
    )
    if card.full:
        return f'<a class="thumb" href="{_e(card.full)}">{image}</a>'
    return f'<div class="thumb">{image}</div>'


def _placeholder(record: ImageRecord) -> str:
    label = PLACEHOLDER_LABELS.get(record.finish_reason)
    if label is None:  # a SUCCESS without a stored image: the upload failed, bytes kept locally
        label = "Not uploaded" if record.spill_path else "No preview"
    why = record.error or ""
    if record.spill_path:
        why = f"{why} ({record.spill_path})".strip()
    detail = f'<span class="why">{_e(why)}</span>' if why else ""
    return f'<div class="thumb placeholder"><span class="label">{_e(label)}</span>{detail}</div>'


def _alt(prompt: str, limit: int = 120) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _facts(record: ImageRecord) -> str:
    facts = [
        ("seed", record.seed),
        ("model", record.model),
        ("aspect", record.aspect_ratio),
        ("finish", record.finish_reason.value),
    ]
    if record.item_id is not None:
        facts.append(("id", record.item_id))
    if record.input_image:
        facts.append(("edits", _input_name(record.input_image)))
    return "".join(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>" for name, value in facts)


def _input_name(reference: str) -> str:
    """What a person recognises of a Kontext edit's input: its file name, not a whole data URI."""
    if reference.startswith("data:"):
        return "an inline image (data URI)"
    return reference.rstrip("/").rsplit("/", 1)[-1] or reference


def _badges(record: ImageRecord) -> str:
    reason = record.finish_reason.value
    badges = [(f"b-{reason}", reason)]
    if record.finish_reason in (FinishReason.SUCCESS, FinishReason.CONTENT_FILTERED):
        badges.append(("b-cached", "cached") if record.cached else ("b-new", "new"))
    return "".join(f'<span class="badge {_e(cls)}">{_e(text)}</span>' for cls, text in badges)


def _card_html(card: _Card) -> str:
    record = card.record
    reason = record.finish_reason.value
    stored = record.finish_reason is not FinishReason.SUCCESS or card.src is not None
    classes = f"card r-{reason}" + ("" if stored else " nostore")
    return (
        f'<article class="{_e(classes)}" data-reason="{_e(reason)}" '
        f'data-cached="{"true" if record.cached else "false"}" data-cache-key="{_e(record.cache_key)}">'
        f"{_picture(card)}"
        f'<div class="body"><p class="prompt">{_e(record.prompt)}</p>'
        f'<dl class="facts">{_facts(record)}</dl>'
        f'<div class="badges">{_badges(record)}</div></div></article>'
    )


def _filters(records: Sequence[ImageRecord]) -> str:
    counts = count_outcomes(records)
    boxes = "".join(
        f'<label><input type="checkbox" name="reason" value="{_e(reason)}" checked> '
        f"{_e(reason)} ({count})</label>"
        for reason, count in counts.items()
        if count
    )
    return f"<fieldset><legend>Finish reason</legend>{boxes}</fieldset>"


def contact_sheet_html(
    records: Sequence[ImageRecord],
    *,
    href: Href,
    summary: Iterable[tuple[str, str]],
    title: str,
    subtitle: str = "",
    notes: Iterable[str] = (),
    manifest_href: str | None = None,
) -> str:
    """The whole page as one string: cards in manifest order, summary, filters, search.

    `href` turns an object key into a link; it decides whether the page links relatively,
    to local files or through signed URLs.
    """
    cards = "".join(_card_html(_card_of(record, href)) for record in records)
    summary_items = "".join(f"<li><b>{_e(k)}:</b> {_e(v)}</li>" for k, v in summary)
    note_items = "".join(f'<p class="note">{_e(note)}</p>' for note in notes)
    manifest = (
        f' · <a href="{_e(manifest_href)}">manifest.jsonl</a>' if manifest_href is not None else ""
    )
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    total = len(records)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="flux-flows">'
        f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_FALLBACK_JS}</script>"
        "</head><body>"
        f'<header><h1>{_e(title)}</h1><p class="where">{_e(subtitle)}{manifest} · made {made}</p>'
        f'<ul class="summary">{summary_items}</ul>{note_items}</header>'
        f'<div class="controls">{_filters(records)}'
        '<input type="search" id="search" placeholder="Search prompt, seed, model, error…" '
        'aria-label="Search" autocomplete="off">'
        f'<span class="count">showing <span id="shown">{total}</span> of {total}</span></div>'
        f'<main id="cards">{cards}</main>'
        '<p id="empty" class="empty" hidden>No image matches the filters.</p>'
        f"<script>{_FILTER_JS}</script></body></html>\n"
    )


# --------------------------------------------------------------------------------------------
# Writing the page for a run
# --------------------------------------------------------------------------------------------


def write_contact_sheets(storage: Storage, run_id: str, report: BatchReport) -> str:
    """The run's page under runs/<id>/ and the latest-run copy at the root; returns the first.

    Each copy gets links relative to where it is stored, so both work on disk and in a bucket
    served as a static site.
    """
    summary = summary_lines(report)
    uris = []
    for page_key in (layout.run_contact_sheet_key(run_id), layout.CONTACT_SHEET):
        page = contact_sheet_html(
            report.records,
            href=relative_href(page_key),
            summary=summary,
            title=f"flux-flows run {run_id}",
            subtitle=report.destination,
            manifest_href=layout.MANIFEST,  # each page sits beside its manifest
        )
        uris.append(storage.put(page_key, page.encode("utf-8"), content_type=HTML_CONTENT_TYPE))
    return uris[0]


# --------------------------------------------------------------------------------------------
# A page for an earlier manifest (`flux-flows gallery`)
# --------------------------------------------------------------------------------------------

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
    """Where `build_gallery` wrote the page, and how many thumbnails it copied beside it."""

    path: Path
    downloaded: int = 0
    missing: int = 0


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
    storage: Storage, records: Sequence[ImageRecord], folder: Path
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


def _prefer_copies(copied: set[str], fallback: Href) -> Href:
    """Relative links to the copies beside the page; `fallback` for everything else."""
    here = relative_href(GALLERY_PAGE)
    return lambda key: here(key) if key in copied else fallback(key)


def build_gallery(
    manifest_uri: str,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    expires_s: int = DEFAULT_EXPIRES_S,
    aws_credentials: Any = None,
) -> GalleryPage:
    """Write a contact sheet for an earlier run's manifest; returns where it is.

    A local manifest's page goes beside it (or into `out_dir`/index.html) with relative links
    to the destination's files. An S3 manifest's page is written locally
    (./flux-flows-gallery/index.html by default) with signed links valid for `expires_s`; with
    `download`, the thumbnails are copied beside the page and linked relatively, so the grid
    keeps working after the links expire.
    """
    _check_expiry(expires_s)
    is_s3 = is_s3_uri(manifest_uri)
    records = load_manifest(manifest_uri, aws_credentials=aws_credentials)
    storage = open_storage(destination_of_manifest(manifest_uri), aws_credentials=aws_credentials)
    page = _page_path(manifest_uri, out_dir, is_s3)
    page.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if isinstance(storage, LocalStorage):
        href = local_href(storage.root, page.parent)
    else:
        href = signed_href(storage, expires_s)
        until = (datetime.now(UTC) + timedelta(seconds=expires_s)).strftime("%Y-%m-%d %H:%M UTC")
        notes.append(
            f"Links to S3 are signed and expire at {until}: run `flux-flows gallery` again "
            "for fresh ones."
        )
    copied: set[str] = set()
    missing = 0
    if download:
        copied, missing = _download_thumbnails(storage, records, page.parent)
        href = _prefer_copies(copied, href)
    body = contact_sheet_html(
        records,
        href=href,
        summary=manifest_summary(records, manifest_uri),
        title=f"flux-flows gallery: {manifest_uri.rsplit('/', 1)[-1]}",
        subtitle=manifest_uri,
        notes=notes,
        manifest_href=None if is_s3 else local_manifest_href(manifest_uri, page.parent),
    )
    page.write_text(body, encoding="utf-8")
    return GalleryPage(page, downloaded=len(copied), missing=missing)


def local_manifest_href(manifest_uri: str, page_dir: Path) -> str:
    manifest = Path(manifest_uri).expanduser().absolute()
    return local_href(manifest.parent, page_dir)(manifest.name)
