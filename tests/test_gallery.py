"""Thumbnails, the contact sheet and `flux-flows gallery`, on real parts.

Runs go through the real flow on the emulator into a local folder or a moto S3 bucket; pages are
checked by parsing the HTML (html.parser), never by string matching on markup alone.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import boto3
import httpx
import pytest
from PIL import Image
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from typer.testing import CliRunner

from flux_flows import generate_image, upload_image
from flux_flows.cli import ExitCode, app
from flux_flows.flows import generate_images
from flux_flows.gallery import write_contact_sheets
from flux_flows.gallery.index import SheetText
from flux_flows.gallery.links import object_key_of, relative_href
from flux_flows.gallery.page import HTML_CONTENT_TYPE, contact_sheet_html
from flux_flows.gallery.paging import PAGE_SIZE
from flux_flows.gallery.sheets import write_sheet
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.planning import layout
from flux_flows.records import reports as reporting
from flux_flows.records.manifests import read_manifest, write_manifests
from flux_flows.records.reports import OUTCOME_ORDER, count_outcomes, problems_first
from flux_flows.rendering import thumbnails
from flux_flows.results import BatchReport, ImageRecord
from flux_flows.storage import LocalStorage
from flux_flows.storage.s3_client import get_s3_client
from helpers.runs import report_of, synthetic_run

pytestmark = pytest.mark.usefixtures("flow_env")

# Everything the page itself is made of; anything else in a parsed page came from user text.
PAGE_TAGS = {
    "html", "head", "meta", "title", "style", "script", "body", "header", "h1", "p", "a", "ul",
    "li", "b", "span", "div", "fieldset", "legend", "label", "input", "main", "article", "img",
    "dl", "dt", "dd",
}  # fmt: skip
PAGE_ATTRIBUTES = {
    "lang", "charset", "http-equiv", "content", "name", "class", "href", "type", "value",
    "checked", "id", "placeholder", "aria-label", "autocomplete", "hidden", "data-reason",
    "data-cached", "data-cache-key", "src", "data-full", "alt", "width", "height", "loading",
    "decoding",
}  # fmt: skip
# The index and the page navigation of a paged sheet add these, and nothing else.
PAGED_TAGS = PAGE_TAGS | {"nav", "section", "h2", "ol"}


def run(prompts: list[Any], destination: str, **kwargs: Any) -> tuple[BatchReport, Any]:
    state = generate_images(prompts, destination, return_state=True, **kwargs)
    return state.result(), state


# --- reading a page ----------------------------------------------------------------------------


@dataclass
class Card:
    attrs: dict[str, str]
    images: list[dict[str, str]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    prompt: str = ""

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.texts).split())


class Page(HTMLParser):
    """Every element and attribute of a page, and its cards with their images, links and text."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.cards: list[Card] = []
        self.scripts: list[str] = []
        self.texts: list[str] = []
        self.pager: list[str] = []  # links of a paged sheet's <nav>, in order
        self._stack: list[str] = []
        self._card_depth: int | None = None
        self._in_prompt = False
        self.feed(source)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self.tags.append((tag, values))
        if tag in ("img", "input", "meta"):
            self._element(tag, values)
            return
        self._stack.append(tag)
        if tag == "a" and "nav" in self._stack:
            self.pager.append(values.get("href", ""))
        if tag == "article":
            self._card_depth = len(self._stack)
            self.cards.append(Card(values))
        self._element(tag, values)
        self._in_prompt = self._card_depth is not None and "prompt" in values.get("class", "")

    def _element(self, tag: str, values: dict[str, str]) -> None:
        if self._card_depth is None or not self.cards:
            return
        if tag == "img":
            self.cards[-1].images.append(values)
        if tag == "a":
            self.cards[-1].links.append(values.get("href", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "article" and self._card_depth is not None:
            self._card_depth = None
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()
        self._in_prompt = False

    def handle_data(self, data: str) -> None:
        if self._stack and self._stack[-1] == "script":
            self.scripts.append(data)
            return
        self.texts.append(data)
        if self._card_depth is not None and self.cards:
            self.cards[-1].texts.append(data)
            if self._in_prompt:
                self.cards[-1].prompt += data

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.texts).split())


def read_page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def resolve(page: Path, link: str) -> Path:
    return (page.parent / unquote(link)).resolve()


# --- the contact sheet of a run ------------------------------------------------------------------


def test_contact_sheet_of_a_mixed_run(tmp_path: Path, flow_env: Any) -> None:
    destination = tmp_path / "out"
    run(["a red fox"], str(destination), safety_check=True)  # stored before the batch
    prompts = ["a calm lake", "a red fox", "something nsfw", "broken [[status:400]]", "a calm lake"]
    report, _ = run(prompts, str(destination), safety_check=True)

    assert report.contact_sheet_uri and report.manifest_uri
    page_path = Path(report.contact_sheet_uri)
    assert page_path.parent == Path(report.manifest_uri).parent
    assert page_path.name == layout.CONTACT_SHEET
    page = read_page(page_path)
    assert [c.attrs["data-reason"] for c in page.cards] == [
        "SUCCESS",
        "SUCCESS",
        "CONTENT_FILTERED",
        "ERROR",
        "SUCCESS",
    ]
    lake, fox, filtered, failed, lake_again = page.cards
    records = report.records
    for card, record in ((lake, records[0]), (fox, records[1]), (lake_again, records[4])):
        (image,) = card.images
        assert image["src"] == f"../../thumbs/{record.cache_key}.jpg"
        assert image["loading"] == "lazy"
        assert resolve(page_path, image["src"]) == Path(record.thumbnail_uri or "").resolve()
        assert resolve(page_path, image["data-full"]) == Path(record.uri or "").resolve()
        assert card.links == [image["data-full"]]
        assert card.prompt == record.prompt
        assert str(record.seed) in card.text and record.model in card.text
        assert "1:1" in card.text
    assert "new" in lake.text.split() and "cached" in fox.text.split()
    assert "cached" in lake_again.text.split()
    assert not filtered.images and not filtered.links and "Content filtered" in filtered.text
    assert not failed.images and "Failed" in failed.text
    assert "InvalidRequestError" in failed.text and (records[3].error or "") in failed.text
    # The summary comes from reporting.summary_lines.
    assert f"API calls: {report.api_calls}" in page.text
    assert "already stored (cache hits): 2" in page.text and "estimated cost: $" in page.text
    # The latest-run copy at the root links from the root.
    latest_path = destination / layout.CONTACT_SHEET
    latest = read_page(latest_path)
    assert latest.cards[0].images[0]["src"] == f"thumbs/{records[0].cache_key}.jpg"
    assert resolve(latest_path, latest.cards[0].images[0]["src"]).is_file()
    assert_offline(page)
    # A run of up to PAGE_SIZE images keeps one page: no folder of pages.
    assert not (page_path.parent / "contact-sheet").exists()


def assert_offline(page: Page) -> None:
    """Nothing on the page loads from anywhere but the destination: no CDN, no network."""
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"link", "iframe", "object", "embed", "form"}
    for tag, attrs in page.tags:
        assert not (tag == "script" and "src" in attrs)
        for name in ("src", "href"):
            assert not attrs.get(name, "").startswith(("http:", "https:", "//")), (tag, attrs)
    csp = [a["content"] for t, a in page.tags if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0] and "unsafe-inline" not in csp[0]


def test_records_carry_thumbnails_and_cache_hits_point_at_them(tmp_path: Path) -> None:
    first, _ = run(["a thumb fox", "nsfw thumb"], str(tmp_path), safety_check=True)
    fox, filtered = first.records
    assert fox.thumbnail_uri == str(tmp_path / "thumbs" / f"{fox.cache_key}.jpg")
    assert Path(fox.thumbnail_uri).is_file()
    assert filtered.finish_reason is FinishReason.CONTENT_FILTERED
    assert filtered.thumbnail_uri is None
    assert sorted(p.name for p in (tmp_path / "thumbs").iterdir()) == [f"{fox.cache_key}.jpg"]
    manifest = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["thumbnail_uri"] == fox.thumbnail_uri
    again, _ = run(["a thumb fox", "nsfw thumb"], str(tmp_path), safety_check=True)
    assert again.api_calls == 0 and again.records[0].cached
    assert again.records[0].thumbnail_uri == fox.thumbnail_uri
    assert again.records[1].thumbnail_uri is None


def test_a_run_without_thumbnails_stores_none_and_its_sheet_shows_the_images(
    tmp_path: Path, flow_env: Any
) -> None:
    """`thumbnails=False` (big unattended batches: ~4 ms of CPU and a PUT less per image, benchmarks/RESULTS.md)."""
    report, _ = run(["a bare fox", "a bare owl"], str(tmp_path), thumbnails=False)
    assert report.counts[FinishReason.SUCCESS] == 2
    assert not (tmp_path / "thumbs").exists()
    assert all(r.thumbnail_uri is None and Path(r.uri or "").is_file() for r in report.records)
    page_path = Path(report.contact_sheet_uri or "")
    page = read_page(page_path)
    for card, record in zip(page.cards, report.records, strict=True):
        (image,) = card.images
        assert resolve(page_path, image["src"]) == Path(record.uri or "").resolve()


@pytest.mark.parametrize(
    ("aspect_ratio", "output_format"),
    [("1:1", "jpeg"), ("16:9", "jpeg"), ("9:21", "jpeg"), ("3:2", "png")],
)
def test_thumbnails_are_256_px_jpegs(tmp_path: Path, aspect_ratio: str, output_format: str) -> None:
    report, _ = run(
        [f"a {aspect_ratio} harbour"],
        str(tmp_path),
        aspect_ratio=aspect_ratio,
        output_format=output_format,
    )
    record = report.records[0]
    data = Path(record.thumbnail_uri or "").read_bytes()
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG"
        assert max(thumb.size) == thumbnails.LONG_SIDE
        width, height = ImageRequest(prompt="x", aspect_ratio=aspect_ratio).size
        assert thumb.width / thumb.height == pytest.approx(width / height, rel=0.02)
    assert len(data) < 20_000


def test_local_run_reads_nothing_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    original = LocalStorage.get

    def counting_get(self: LocalStorage, key: str) -> bytes:
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(LocalStorage, "get", counting_get)
    report, _ = run(["no re-read fox", "no re-read cat"], str(tmp_path))
    assert report.counts["SUCCESS"] == 2 and all(r.thumbnail_uri for r in report.records)
    assert reads == []


def test_s3_run_makes_thumbnails_without_get_object(s3_bucket: str) -> None:
    """GetObject requests actually sent: signing links for the summary artifact sends none."""
    sent: list[str] = []
    events = get_s3_client().meta.events

    def count(request: Any, **_: Any) -> None:
        sent.append(request.url)

    events.register("before-send.s3.GetObject", count)
    try:
        report, _ = run(
            ["s3 thumb fox", "s3 thumb nsfw", "s3 thumb whale"],
            f"s3://{s3_bucket}/renders/",
            safety_check=True,
        )
        get_s3_client().get_object(Bucket=s3_bucket, Key="renders/manifest.jsonl")  # the probe
    finally:
        events.unregister("before-send.s3.GetObject", count)
    assert len(sent) == 1 and sent[0].endswith("/renders/manifest.jsonl")
    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    thumbs = sorted(k for k in keys if k.startswith("renders/thumbs/"))
    successes = [r for r in report.records if r.finish_reason is FinishReason.SUCCESS]
    assert thumbs == sorted(f"renders/thumbs/{r.cache_key}.jpg" for r in successes)
    assert s3.head_object(Bucket=s3_bucket, Key=thumbs[0])["ContentType"] == "image/jpeg"
    assert report.contact_sheet_uri and report.contact_sheet_uri.startswith(
        f"s3://{s3_bucket}/renders/runs/"
    )
    for key in (report.contact_sheet_uri.split("/", 3)[3], f"renders/{layout.CONTACT_SHEET}"):
        head = s3.head_object(Bucket=s3_bucket, Key=key)
        assert head["ContentType"] == HTML_CONTENT_TYPE
    body = s3.get_object(Bucket=s3_bucket, Key=f"renders/{layout.CONTACT_SHEET}")["Body"].read()
    page = Page(body.decode("utf-8"))
    assert page.cards[0].images[0]["src"] == f"thumbs/{successes[0].cache_key}.jpg"


class Boom(OSError):
    pass


def break_the_encoder(monkeypatch: pytest.MonkeyPatch, _destination: Path) -> None:
    def fail(data: bytes, long_side: int = 256) -> bytes:
        raise Boom("encoder exploded")

    monkeypatch.setattr(thumbnails, "make_thumbnail", fail)


def block_the_thumbs_folder(_monkeypatch: pytest.MonkeyPatch, destination: Path) -> None:
    destination.mkdir(parents=True)
    (destination / "thumbs").write_text("a file where the thumbs folder should be")


@pytest.mark.parametrize("breakage", [break_the_encoder, block_the_thumbs_folder])
def test_thumbnail_failure_never_fails_or_spills_the_image(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    breakage: Any,
) -> None:
    destination = tmp_path / "out"
    breakage(monkeypatch, destination)
    with caplog.at_level(logging.WARNING, logger="flux_flows.rendering.thumbnails"):
        report, state = run(["fragile fox"], str(destination))
    (record,) = report.records
    assert state.is_completed() and record.finish_reason is FinishReason.SUCCESS
    assert record.uri and Path(record.uri).is_file()
    assert record.thumbnail_uri is None and record.spill_path is None and record.error is None
    assert report.spilled == 0
    assert "no thumbnail" in caplog.text
    page_path = Path(report.contact_sheet_uri or "")
    (image,) = read_page(page_path).cards[0].images
    assert resolve(page_path, image["src"]) == Path(record.uri).resolve()


# --- untrusted text ------------------------------------------------------------------------------

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "</script><script>alert(document.cookie)</script>",
    '" onmouseover="alert(1)" data-x="',
    "'><svg/onload=alert(1)>",
    "</title></style></textarea><iframe src=javascript:alert(1)>",
    "&lt;b&gt;already escaped&lt;/b&gt; &amp; <!-- comment --> ]]>",
    "<a href='javascript:alert(1)'>click</a> [[status:400]]",
]


def test_hostile_prompts_are_shown_as_text(tmp_path: Path) -> None:
    prompts: list[Any] = [*HOSTILE[:-1], {"prompt": HOSTILE[-1], "id": "<b id=pwn>sku</b>"}]
    report, _ = run(prompts, str(tmp_path))
    assert report.counts["ERROR"] == 1 and report.counts["SUCCESS"] == len(HOSTILE) - 1
    source = Path(report.contact_sheet_uri or "").read_text(encoding="utf-8")
    page = Page(source)
    assert {tag for tag, _ in page.tags} <= PAGE_TAGS
    assert {name for _, attrs in page.tags for name in attrs} <= PAGE_ATTRIBUTES
    assert len(page.scripts) == 2 and source.count("</script>") == 2
    assert [card.prompt for card in page.cards] == [r.prompt for r in report.records]
    assert "<b id=pwn>sku</b>" in page.cards[-1].text
    for _, attrs in page.tags:
        for name in ("href", "src"):
            assert "javascript" not in attrs.get(name, "").lower()
    assert "alert" not in " ".join(page.scripts)


def test_page_escapes_every_field_even_without_a_run() -> None:
    """A tampered manifest: hostile text in every field the page shows, and bogus URIs."""
    request = ImageRequest(prompt="<script>alert(1)</script>", seed=5)
    record = ImageRecord.for_request(
        request,
        index=0,
        variant=0,
        finish_reason=FinishReason.SUCCESS,
        uri="javascript:alert(1)//images/x.jpg",
        thumbnail_uri="/tmp/x/thumbs/<svg onload=alert(1)>.jpg",
        item_id='"><img src=x onerror=alert(1)>',
    )
    error = ImageRecord.for_request(
        request, index=1, variant=0, finish_reason=FinishReason.ERROR, error="<b>boom</b>"
    )
    source = contact_sheet_html(
        [record, error],
        href=relative_href("runs/r/contact-sheet.html"),
        summary=[("<i>label</i>", "<u>value</u>")],
        title="<title>t",
        notes=["<script>n()</script>"],
    )
    page = Page(source)
    assert {tag for tag, _ in page.tags} <= PAGE_TAGS
    assert {name for _, attrs in page.tags for name in attrs} <= PAGE_ATTRIBUTES
    # The image URI named an object the layout allows, under a scheme: linked only as the key.
    (image,) = page.cards[0].images
    assert image["src"] == "../../images/x.jpg"
    assert "<b>boom</b>" in page.cards[1].text and "<u>value</u>" in page.text


BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"


def test_bidi_controls_in_prompts_are_shown_not_obeyed() -> None:
    """A right-to-left override would display "invoice_exe.jpg" for a prompt that says gpj."""
    spoof = "invoice_\u202egpj.exe\u202c, " + BIDI
    request = ImageRequest(prompt=spoof, seed=5)
    record = ImageRecord.for_request(
        request, index=0, variant=0, finish_reason=FinishReason.ERROR, error=spoof
    )
    source = contact_sheet_html(
        [record],
        href=relative_href("runs/r/contact-sheet.html"),
        summary=[(spoof, spoof)],
        title=spoof,
        notes=[spoof],
    )
    assert not set(BIDI) & set(source)
    shown = "invoice_<U+202E>gpj.exe<U+202C>, " + "".join(f"<U+{ord(c):04X}>" for c in BIDI)
    (card,) = Page(source).cards
    assert card.prompt == shown
    assert "invoice_&lt;U+202E&gt;gpj.exe" in source


def test_object_keys_come_only_from_the_layout() -> None:
    assert object_key_of("/data/out/images/fox-abc.jpg") == "images/fox-abc.jpg"
    assert object_key_of("s3://b/p/thumbs/abc.jpg") == "thumbs/abc.jpg"
    assert object_key_of(r"C:\out\images\fox.png") == "images/fox.png"
    assert object_key_of("/data/out/secrets/x.jpg") is None
    assert object_key_of("/x/images/a b.jpg") is None
    assert object_key_of(None) is None
    assert relative_href("runs/r1/contact-sheet.html")("thumbs/a.jpg") == "../../thumbs/a.jpg"
    assert relative_href("contact-sheet.html")("images/a b.jpg") == "images/a%20b.jpg"


# --- paged sheets of big runs ----------------------------------------------------------------------


def links_of(page: Page) -> list[str]:
    return [attrs["href"] for tag, attrs in page.tags if tag == "a"]


def write_big_run(root: Path, count: int) -> tuple[list[ImageRecord], Path]:
    """A run of `count` synthetic records, with its manifest and contact sheet written."""
    records = synthetic_run(root, count, files=8)
    storage = LocalStorage(root)
    report = report_of(records, root)
    report.manifest_uri = write_manifests(storage, "big", records)
    return records, Path(write_contact_sheets(storage, "big", report))


def in_reading_order(records: list[ImageRecord]) -> list[ImageRecord]:
    return sorted(records, key=lambda r: OUTCOME_ORDER.index(r.finish_reason))


def test_big_run_is_paged_failures_first(tmp_path: Path) -> None:
    records, index_path = write_big_run(tmp_path, 2_600)
    counts = count_outcomes(records)
    assert counts["SUCCESS"] > 2 * PAGE_SIZE and counts["SKIPPED_BUDGET"] > 0
    assert index_path == tmp_path / "runs" / "big" / layout.CONTACT_SHEET
    folder = index_path.parent / "contact-sheet"
    names = ["failed-1", "filtered-1", "skipped-1", "images-1", "images-2", "images-3"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.html" for n in names)

    for index_at in (index_path, tmp_path / layout.CONTACT_SHEET):  # the run's and the latest
        index = read_page(index_at)
        assert not index.cards and not index.scripts
        assert not any(tag == "img" for tag, _ in index.tags)
        assert_offline(index)
        links = links_of(index)
        assert all(resolve(index_at, link).is_file() for link in links)
        pages = [resolve(index_at, link) for link in links if link.endswith(".html")]
        assert pages == [(folder / f"{name}.html").resolve() for name in names]
        assert resolve(index_at, links[0]).name == layout.MANIFEST
        text = index.text
        assert f"Failed (ERROR): {counts['ERROR']}" in text
        assert f"Content filtered: {counts['CONTENT_FILTERED']}" in text
        assert f"Images: {counts['SUCCESS']:,}" in text and "Images 1,001–2,000" in text
        assert f"images requested: {len(records)}" in text

    shown: list[str] = []
    for number, name in enumerate(names):
        page_path = folder / f"{name}.html"
        page = assert_links_resolve(page_path, expect_images=None)
        assert 0 < len(page.cards) <= PAGE_SIZE
        assert len({card.attrs["data-reason"] for card in page.cards}) == 1
        assert len(page.scripts) == 2
        assert_offline(page)
        assert resolve(page_path, page.pager[0]) == index_path.resolve()  # "All pages"
        neighbours = [resolve(page_path, link).name for link in page.pager[1:]]
        expected = [f"{names[i]}.html" for i in (number - 1, number + 1) if 0 <= i < len(names)]
        assert neighbours == expected
        assert f"page {number + 1} of {len(names)}" in page.text
        shown += [card.attrs["data-cache-key"] for card in page.cards]
    # Every record once, failures first, manifest order within a finish reason.
    assert shown == [r.cache_key for r in in_reading_order(records)]
    failed = read_page(folder / "failed-1.html")
    errors = [r for r in records if r.finish_reason is FinishReason.ERROR]
    assert [card.prompt for card in failed.cards] == [r.prompt for r in errors]
    assert all("InvalidRequestError" in card.text for card in failed.cards)


def test_one_page_holds_at_most_page_size_cards(tmp_path: Path) -> None:
    """Exactly PAGE_SIZE images stay one page; one more makes an index and pages."""
    records = synthetic_run(tmp_path, PAGE_SIZE + 1, files=2)
    store = LocalStorage(tmp_path)
    text = SheetText(title="edge")
    one = write_sheet(
        store, ["one.html"], records[:PAGE_SIZE], count_outcomes(records[:PAGE_SIZE]),
        href_for=relative_href, text=text,
    )  # fmt: skip
    assert one.pages == 1 and len(read_page(tmp_path / "one.html").cards) == PAGE_SIZE
    more = write_sheet(
        store, ["more.html"], iter(records), count_outcomes(records),
        href_for=relative_href, text=text,
    )  # fmt: skip
    assert more.pages == len([n for n in count_outcomes(records).values() if n])
    images = read_page(tmp_path / "contact-sheet" / "images-1.html")
    assert len(images.cards) == count_outcomes(records)["SUCCESS"] <= PAGE_SIZE


def test_records_must_match_their_counts(tmp_path: Path) -> None:
    records = synthetic_run(tmp_path, 12, files=1)
    counts = count_outcomes(records)
    store, text = LocalStorage(tmp_path), SheetText(title="t")
    fewer = {**counts, "SUCCESS": counts["SUCCESS"] - 1}
    with pytest.raises(ValueError, match="more SUCCESS records"):
        write_sheet(
            store, ["i.html"], records, fewer, href_for=relative_href, text=text, page_size=2
        )
    more = {**counts, "ERROR": counts["ERROR"] + 1}
    with pytest.raises(ValueError, match="fewer ERROR records"):
        write_sheet(
            store, ["i.html"], records, more, href_for=relative_href, text=text, page_size=2
        )


def test_paged_sheet_escapes_every_field(tmp_path: Path) -> None:
    records = [
        ImageRecord.for_request(
            ImageRequest(prompt=prompt, seed=i + 1),
            index=i,
            variant=0,
            finish_reason=FinishReason.ERROR if i % 2 else FinishReason.SUCCESS,
            error=prompt if i % 2 else None,
            uri=f"/x/images/{i}.jpg",
            item_id=HOSTILE[0],
        )
        for i, prompt in enumerate(HOSTILE)
    ]
    text = SheetText(
        title=HOSTILE[1],
        subtitle=HOSTILE[2],
        summary=[(HOSTILE[3], HOSTILE[4])],
        notes=[HOSTILE[5]],
        manifest_href="manifest.jsonl",
    )
    written = write_sheet(
        LocalStorage(tmp_path), ["runs/r/contact-sheet.html"], records, count_outcomes(records),
        href_for=relative_href, text=text, page_size=2,
    )  # fmt: skip
    assert written.pages == 4
    paths = [tmp_path / "runs" / "r" / "contact-sheet.html"]
    paths += sorted((tmp_path / "runs" / "r" / "contact-sheet").iterdir())
    prompts = []
    for path in paths:
        source = path.read_text(encoding="utf-8")
        page = Page(source)
        assert {tag for tag, _ in page.tags} <= PAGED_TAGS
        assert {name for _, attrs in page.tags for name in attrs} <= PAGE_ATTRIBUTES
        assert source.count("</script>") == len(page.scripts) == (2 if page.cards else 0)
        assert "alert" not in " ".join(page.scripts)
        assert HOSTILE[1] in page.text and HOSTILE[5] in page.text  # title and notes, as text
        for _, attrs in page.tags:
            for name in ("href", "src"):
                assert "javascript" not in attrs.get(name, "").lower()
        prompts += [card.prompt for card in page.cards]
    assert sorted(prompts) == sorted(HOSTILE)
    assert f"{HOSTILE[3]}: {HOSTILE[4]}" in read_page(paths[0]).text  # the summary, on the index


def test_gallery_pages_a_big_manifest(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    records, _ = write_big_run(destination, 1_500)
    manifest = destination / layout.MANIFEST
    assert len(read_manifest(manifest.read_bytes(), str(manifest))) == 1_500
    for args, index_at in (
        ((), destination / layout.CONTACT_SHEET),
        (("-o", str(tmp_path / "elsewhere")), tmp_path / "elsewhere" / "index.html"),
        (("-o", str(tmp_path / "dl"), "--download"), tmp_path / "dl" / "index.html"),
    ):
        result = invoke("gallery", str(manifest), *args)
        assert result.exit_code == 0, result.output
        assert f"Contact sheet: {index_at}" in result.output
        index = read_page(index_at)
        assert not index.cards
        pages = [link for link in links_of(index) if link.startswith("contact-sheet/")]
        assert len(pages) == len([n for n in count_outcomes(records).values() if n]) + 1
        cards = 0
        for link in pages:
            page = assert_links_resolve(resolve(index_at, link), expect_images=None)
            cards += len(page.cards)
        assert cards == len(records)
    copied = read_page(tmp_path / "dl" / "contact-sheet" / "images-1.html")
    assert copied.cards[0].images[0]["src"].startswith("../thumbs/shared-")


def test_problems_first_caps_and_streams(tmp_path: Path) -> None:
    records = synthetic_run(tmp_path, 300, files=1)
    assert all(count_outcomes(records)[reason.value] for reason in OUTCOME_ORDER[:3])
    chosen, left_out = problems_first(iter(records), 50)
    assert chosen == in_reading_order(records)[:50] and left_out == 250
    chosen, left_out = problems_first(records, 1_000)
    assert chosen == in_reading_order(records) and left_out == 0


def test_table_artifact_is_capped_failures_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reporting, "ARTIFACT_TABLE_ROWS", 3)
    prompts = ["cap fox", "cap owl", "cap nsfw", "cap whale", "cap [[status:400]]", "cap cat"]
    report, state = run(prompts, str(tmp_path), safety_check=True)
    artifacts = artifacts_of(state)
    table = json.loads(artifacts["table"].data)
    assert [row["finish_reason"] for row in table] == ["ERROR", "CONTENT_FILTERED", "SUCCESS"]
    assert [row["prompt"] for row in table] == ["cap [[status:400]]", "cap nsfw", "cap fox"]
    for text in (artifacts["table"].description or "", str(artifacts["markdown"].data)):
        assert "shows 3 of 6 records" in text and "3 more are left out" in text
        assert f"`{report.manifest_uri}`" in text


# --- the summary artifact ------------------------------------------------------------------------


def artifacts_of(state: Any) -> dict[str, Any]:
    """The flow run's artifacts by type (one of each but progress)."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    (markdown,) = [a for a in artifacts if a.type == "markdown"]
    (table,) = [a for a in artifacts if a.type == "table"]
    return {"markdown": markdown, "table": table}


def summary_artifact(state: Any) -> str:
    return str(artifacts_of(state)["markdown"].data)


def test_summary_artifact_local_says_where_the_thumbnails_are(tmp_path: Path) -> None:
    report, state = run(["artifact lake", "artifact hill"], str(tmp_path))
    text = summary_artifact(state)
    assert "## Thumbnails" in text and "cannot show from another machine" in text
    assert str(tmp_path / "thumbs") in text
    assert f"Contact sheet: `{report.contact_sheet_uri}`" in text
    assert "![" not in text


def test_summary_artifact_s3_shows_a_strip_of_signed_thumbnails(s3_bucket: str) -> None:
    prompts = [f"strip {i}" for i in range(14)] + ["strip nsfw"]
    report, state = run(prompts, f"s3://{s3_bucket}/strip/", safety_check=True)
    text = summary_artifact(state)
    thumbs = [part.split(")")[0] for part in text.split("![")[1:]]
    links = [url.split("](", 1)[1] for url in thumbs]
    assert len(links) == 12
    first = httpx.get(links[0])
    assert first.status_code == 200 and first.content[:3] == b"\xff\xd8\xff"
    assert f"/strip/thumbs/{report.records[0].cache_key}.jpg" in links[0]
    assert "valid for up to 7 days" in text and "static site" in text
    assert f"Contact sheet: `{report.contact_sheet_uri}`" in text


# --- flux-flows gallery --------------------------------------------------------------------------

cli = CliRunner()
QUIETED = ("prefect", "prefect.flow_runs", "prefect.task_runs", "docket", "uvicorn")


@pytest.fixture(autouse=True)
def _restore_log_levels() -> Any:
    """The CLI quiets Prefect's loggers for the rest of its process; this one is shared."""
    levels = {name: logging.getLogger(name).level for name in QUIETED}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def invoke(*args: str) -> Any:
    return cli.invoke(app, list(args))


def test_gallery_for_a_local_manifest(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    prompts = ["gallery fox", "gallery nsfw", "gallery [[status:400]]"]
    report, _ = run(prompts, str(destination), safety_check=True)
    manifest = Path(report.manifest_uri or "")
    result = invoke("gallery", str(manifest))
    assert result.exit_code == 0, result.output
    beside = manifest.parent / layout.CONTACT_SHEET
    assert f"Contact sheet: {beside}" in result.output
    assert_links_resolve(beside, expect_images=1)

    elsewhere = tmp_path / "somewhere" / "else"
    result = invoke("gallery", str(destination / layout.MANIFEST), "-o", str(elsewhere))
    assert result.exit_code == 0, result.output
    page = assert_links_resolve(elsewhere / "index.html", expect_images=1)
    assert "API calls: 3" in page.text and "wall time" not in page.text

    copied = tmp_path / "portable"
    result = invoke("gallery", str(manifest), "-o", str(copied), "--download")
    assert result.exit_code == 0, result.output
    page = assert_links_resolve(copied / "index.html", expect_images=1)
    assert page.cards[0].images[0]["src"] == f"thumbs/{report.records[0].cache_key}.jpg"


def assert_links_resolve(page_path: Path, *, expect_images: int | None) -> Page:
    """Every picture and link of every card is a file; `expect_images` None: any number."""
    page = read_page(page_path)
    images = [image for card in page.cards for image in card.images]
    assert expect_images is None or len(images) == expect_images
    for image in images:
        assert resolve(page_path, image["src"]).is_file()
        assert resolve(page_path, image["data-full"]).is_file()
    for card in page.cards:
        for link in card.links:
            assert resolve(page_path, link).is_file()
    return page


def test_gallery_for_an_s3_manifest_signs_or_downloads(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = ["signed fox", "signed whale", "signed nsfw"]
    report, _ = run(prompts, f"s3://{s3_bucket}/g/", safety_check=True)
    manifest = f"s3://{s3_bucket}/g/manifest.jsonl"
    monkeypatch.chdir(tmp_path)
    result = invoke("gallery", manifest, "--expires", "120")
    assert result.exit_code == 0, result.output
    page_path = tmp_path / "flux-flows-gallery" / "index.html"
    page = read_page(page_path)
    images = [image for card in page.cards for image in card.images]
    assert len(images) == 2 and not page.cards[2].images
    with httpx.Client() as http:
        for image in images:
            for url in (image["src"], image["data-full"]):
                assert 100 <= expires_in(url) <= 120
                answer = http.get(url)
                assert answer.status_code == 200 and answer.content[:3] == b"\xff\xd8\xff"
    assert "expire" in page.text

    result = invoke("gallery", manifest, "-o", str(tmp_path / "dl"), "--download")
    assert result.exit_code == 0, result.output
    assert "2 thumbnails copied" in result.output
    page = read_page(tmp_path / "dl" / "index.html")
    for card, record in zip(page.cards[:2], report.records, strict=False):
        src = card.images[0]["src"]
        assert src == f"thumbs/{record.cache_key}.jpg"
        assert (tmp_path / "dl" / src).read_bytes()[:3] == b"\xff\xd8\xff"
        assert card.images[0]["data-full"].startswith("http://127.0.0.1:")


def expires_in(url: str) -> float:
    """Seconds a signed URL has left, for SigV4 (X-Amz-Expires) and SigV2 (Expires=epoch)."""
    query = parse_qs(urlparse(url).query)
    if "X-Amz-Expires" in query:
        signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        return signed.timestamp() + int(query["X-Amz-Expires"][0]) - time.time()
    return int(query["Expires"][0]) - time.time()


def test_gallery_rejects_bad_input(tmp_path: Path) -> None:
    result = invoke("gallery", str(tmp_path / "missing.jsonl"))
    assert result.exit_code == ExitCode.BAD_INPUT and "does not exist" in result.output
    (tmp_path / "m.jsonl").write_text("")
    result = invoke("gallery", str(tmp_path / "m.jsonl"), "--expires", "0")
    assert result.exit_code == ExitCode.BAD_INPUT and "--expires" in result.output


def test_run_command_prints_the_contact_sheet(tmp_path: Path) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("a printed fox\n")
    result = invoke("run", str(source), "--to", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    pages = list((tmp_path / "out" / "runs").glob(f"*/{layout.CONTACT_SHEET}"))
    assert len(pages) == 1
    assert f"Contact sheet: {pages[0]}" in result.output


def test_upload_image_task_makes_the_thumbnail_too(tmp_path: Path) -> None:
    @flow
    def user_flow() -> ImageRecord:
        image = generate_image(ImageRequest(prompt="a task-made fox", seed=9))
        return upload_image(image, str(tmp_path))

    record = user_flow()
    assert record.thumbnail_uri == str(tmp_path / "thumbs" / f"{record.cache_key}.jpg")
    with Image.open(record.thumbnail_uri) as thumb:
        assert thumb.size == (256, 256)


def test_edit_cards_name_their_input_image() -> None:
    from flux_flows.gallery.links import relative_href
    from flux_flows.gallery.page import contact_sheet_html
    from flux_flows.results import ImageRecord

    common = {
        "model": "flux-kontext-pro",
        "aspect_ratio": "1:1",
        "guidance_scale": 3.5,
        "num_inference_steps": 4,
        "safety_check": False,
        "output_format": "jpeg",
        "cache_key": "0" * 32,
        "finish_reason": "ERROR",
        "error": "boom",
    }
    records = [
        ImageRecord(index=0, prompt="winter", seed=1, input_image="/photos/shop-42.png", **common),
        ImageRecord(
            index=1, prompt="night", seed=2, input_image="data:image/png;base64,AAAA", **common
        ),
    ]
    page = contact_sheet_html(
        records, href=relative_href("contact-sheet.html"), summary=[], title="t"
    )
    assert "<dt>edits</dt><dd>shop-42.png</dd>" in page
    assert "an inline image (data URI)" in page and "base64,AAAA" not in page
