"""The contact sheet in a real browser: headless Chromium (Debian's) driven by Playwright.

Opens pages from disk over file://, as a user would after `flux-flows demo`, and checks what only
a browser can: images decode, the filters and search work, the CSP lets the page's own scripts
run, and nothing is logged as an error.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

from flux_flows.flows import generate_images
from flux_flows.gallery import write_contact_sheets
from flux_flows.gallery.links import relative_href
from flux_flows.gallery.page import contact_sheet_html
from flux_flows.gallery.paging import PAGE_SIZE
from flux_flows.models import FinishReason
from flux_flows.planning import layout
from flux_flows.planning.sources import read_prompts
from flux_flows.records.manifests import write_manifests
from flux_flows.records.reports import summary_lines
from flux_flows.results import BatchReport
from flux_flows.storage import LocalStorage
from helpers.runs import report_of, synthetic_run

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 900}
ASPECTS = ["1:1", "16:9", "9:16", "3:2"]

# What the browser itself measured of the last navigation, and how much of the page it loaded.
LOAD_TIMING = """() => {
    const nav = performance.getEntriesByType("navigation")[0];
    const paint = performance.getEntriesByName("first-contentful-paint")[0];
    const loaded = Array.from(document.images).filter((img) => img.naturalWidth > 0);
    return {dom_content_loaded_ms: nav.domContentLoadedEventEnd,
            load_ms: nav.loadEventEnd, first_contentful_paint_ms: paint ? paint.startTime : null,
            images_loaded_at_load: loaded.length, images: document.images.length,
            cards: document.querySelectorAll("main .card").length};
}"""
# Under 1.5 s per page is what issue 15 asks of a paged sheet (measured ~0.2-0.4 s for 1,000 cards).
PAGE_LOAD_LIMIT_MS = 1_500

VISIBLE_CARDS = """() => Array.from(document.querySelectorAll("main .card"))
    .filter((card) => getComputedStyle(card).display !== "none")
    .map((card) => card.dataset.reason)"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"needs Chromium at {CHROMIUM}: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("needs Playwright for Python: pip install playwright")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Tab:
    """One page, with every console error/warning and uncaught exception it produced."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.page = browser.new_page(viewport=VIEWPORT)
        self.problems: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.problems.append(f"pageerror: {error}"))
        self.goto(path.as_uri())

    def goto(self, url: str) -> None:
        self.page.goto(url, wait_until="load")

    def timing(self) -> dict[str, Any]:
        return self.page.evaluate(LOAD_TIMING)

    def _console(self, message: Any) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")

    def load_every_image(self) -> list[dict[str, Any]]:
        """Turn lazy loading off, wait until every image settled, report what each one shows."""
        self.page.evaluate("() => { for (const img of document.images) img.loading = 'eager'; }")
        self.page.wait_for_function(
            "() => Array.from(document.images).every((img) => img.complete && "
            "(img.naturalWidth > 0 || !img.dataset.full))"
        )
        return self.page.evaluate(
            """() => Array.from(document.images, (img) => ({
                src: img.getAttribute("src"), current: img.currentSrc,
                naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
                card: img.closest(".card").dataset.cacheKey,
            }))"""
        )

    def visible_reasons(self) -> list[str]:
        return self.page.evaluate(VISIBLE_CARDS)

    def shown(self) -> int:
        return int(self.page.text_content("#shown") or "-1")

    def close(self) -> None:
        self.page.close()


def demo_prompts() -> list[dict[str, Any]]:
    """The demo's 16 prompts (one the filter catches), one turned into a failure, mixed sizes."""
    source = Path(__file__).parents[1] / "flux_flows" / "examples" / "demo_prompts.txt"
    prompts = [row.fields["prompt"] for row in read_prompts(source)]
    prompts[-1] = "a request the API refuses [[status:400]]"
    return [
        {"prompt": prompt, "aspect_ratio": ASPECTS[i % len(ASPECTS)]}
        for i, prompt in enumerate(prompts)
    ]


def run_demo(destination: Path) -> BatchReport:
    prompts = demo_prompts()
    generate_images(prompts[:3], str(destination), safety_check=True, seed=2026)  # cache hits
    return generate_images(prompts, str(destination), safety_check=True, seed=2026)


def test_contact_sheet_in_chromium(browser: Any, tmp_path: Path, flow_env: Any) -> None:
    report = run_demo(tmp_path / "demo")
    assert report.counts["CONTENT_FILTERED"] == 1 and report.counts["ERROR"] == 1
    assert report.cache_hits == 3 and report.contact_sheet_uri
    tab = Tab(browser, Path(report.contact_sheet_uri))

    images = tab.load_every_image()
    successes = [r for r in report.records if r.finish_reason is FinishReason.SUCCESS]
    assert len(images) == len(successes) == 14
    for image, record in zip(images, successes, strict=True):
        assert image["naturalWidth"] > 0, image
        assert image["src"] == f"../../thumbs/{record.cache_key}.jpg"
        assert max(image["naturalWidth"], image["naturalHeight"]) == 256
    tab.page.screenshot(path=str(tmp_path / "contact-sheet.png"), full_page=True)

    everything = [r.finish_reason.value for r in report.records]
    assert tab.visible_reasons() == everything and tab.shown() == 16
    tab.page.uncheck("input[name=reason][value=SUCCESS]")
    assert tab.visible_reasons() == ["CONTENT_FILTERED", "ERROR"] and tab.shown() == 2
    tab.page.uncheck("input[name=reason][value=ERROR]")
    assert tab.visible_reasons() == ["CONTENT_FILTERED"]
    tab.page.check("input[name=reason][value=SUCCESS]")
    tab.page.check("input[name=reason][value=ERROR]")
    assert tab.visible_reasons() == everything

    tab.page.fill("#search", "LIGHTHOUSE dusk")
    (lighthouse,) = [r for r in report.records if "lighthouse" in r.prompt]
    assert tab.visible_reasons() == ["SUCCESS"] and tab.shown() == 1
    visible_key = tab.page.evaluate(
        "() => document.querySelector('main .card:not([hidden])').dataset.cacheKey"
    )
    assert visible_key == lighthouse.cache_key
    tab.page.fill("#search", "invalidrequesterror")
    assert tab.visible_reasons() == ["ERROR"]
    tab.page.fill("#search", "no card says this")
    assert tab.visible_reasons() == [] and tab.page.is_visible("#empty")
    tab.page.fill("#search", "")
    assert tab.visible_reasons() == everything and not tab.page.is_visible("#empty")

    assert tab.problems == []
    tab.close()


def test_missing_thumbnail_falls_back_to_the_image(
    browser: Any, tmp_path: Path, flow_env: Any
) -> None:
    report = generate_images(["fallback fox", "fallback owl"], str(tmp_path))
    gone = report.records[1]
    Path(gone.thumbnail_uri or "").unlink()
    tab = Tab(browser, tmp_path / layout.CONTACT_SHEET)
    images = tab.load_every_image()
    assert [image["naturalWidth"] > 0 for image in images] == [True, True]
    assert images[1]["current"].endswith(Path(gone.uri or "").name)
    assert images[0]["current"].endswith(f"thumbs/{report.records[0].cache_key}.jpg")
    # The one failed thumbnail request is the only complaint.
    assert len(tab.problems) == 1 and "Failed to load resource" in tab.problems[0]
    tab.close()


def test_thousand_cards_load_fast(
    browser: Any, tmp_path: Path, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    records = synthetic_run(tmp_path, 1000)
    report = report_of(records, tmp_path)
    page_path = tmp_path / layout.CONTACT_SHEET
    page_path.write_text(
        contact_sheet_html(
            records,
            href=relative_href(layout.CONTACT_SHEET),
            summary=summary_lines(report),
            title="1,000 cards",
        ),
        encoding="utf-8",
    )
    tab = Tab(browser, page_path)
    timing = tab.timing()
    timing["filter_ms"] = tab.page.evaluate(
        """() => {
            const box = document.querySelector("input[name=reason][value=SUCCESS]");
            const start = performance.now();
            box.click();
            return performance.now() - start;
        }"""
    )
    assert tab.shown() == len([r for r in records if r.finish_reason is not FinishReason.SUCCESS])
    timing["search_ms"] = tab.page.evaluate(
        """() => {
            document.querySelector("input[name=reason][value=SUCCESS]").click();
            const search = document.getElementById("search");
            const start = performance.now();
            search.value = "photo 999:";
            search.dispatchEvent(new Event("input"));
            return performance.now() - start;
        }"""
    )
    timing["page_kb"] = round(page_path.stat().st_size / 1024)
    with capsys.disabled():
        print(f"\n1,000-card contact sheet in Chromium: {json.dumps(timing)}")
    record_property("thousand_cards", timing)
    assert tab.shown() == 1
    # Lazy loading: only the first screens' thumbnails are loaded, not 1,000.
    assert 0 < timing["images_loaded_at_load"] < 200 and timing["images"] > 900
    assert timing["load_ms"] < 5_000
    assert tab.problems == []
    tab.close()


def test_twenty_thousand_images_page_fast(
    browser: Any, tmp_path: Path, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15: every page of a 20,000-image run's sheet loads clean and in under 1.5 s."""
    records = synthetic_run(tmp_path, 20_000, files=8)
    storage = LocalStorage(tmp_path)
    report = report_of(records, tmp_path)
    report.manifest_uri = write_manifests(storage, "big", records)
    index_path = Path(write_contact_sheets(storage, "big", report))
    tab = Tab(browser, index_path)
    index = tab.timing()
    pages = tab.page.evaluate(
        "() => Array.from(document.querySelectorAll('main a'), (a) => a.href)"
    )
    failures = [r for r in records if r.finish_reason is FinishReason.ERROR]
    assert len(pages) == 23 and pages[0].endswith("/contact-sheet/failed-1.html")
    timings = {}
    for url in pages:
        tab.goto(url)
        timing = tab.timing()
        timing["page_kb"] = round(Path(url2pathname(urlparse(url).path)).stat().st_size / 1024)
        timings[url.rsplit("/", 1)[-1]] = timing
        assert 0 < timing["cards"] <= PAGE_SIZE, (url, timing)
        assert timing["load_ms"] < PAGE_LOAD_LIMIT_MS, (url, timing)
        if url.endswith("/images-1.html"):
            assert timing["images_loaded_at_load"] > 0
            tab.page.fill("#search", "product photo 999:")
            assert tab.shown() == 1
        if url.endswith("/failed-1.html"):
            assert timing["cards"] == len(failures)
            tab.page.fill("#search", f"product photo {failures[-1].index}:")
            assert tab.visible_reasons() == ["ERROR"]
    loads = [t["load_ms"] for t in timings.values()]
    summary = {
        "pages": len(timings),
        "index_kb": round(index_path.stat().st_size / 1024),
        "index_load_ms": index["load_ms"],
        "largest_page_kb": max(t["page_kb"] for t in timings.values()),
        "median_load_ms": statistics.median(loads),
        "max_load_ms": max(loads),
        "max_dom_content_loaded_ms": max(t["dom_content_loaded_ms"] for t in timings.values()),
    }
    with capsys.disabled():
        print(f"\n20,000-image paged contact sheet in Chromium: {json.dumps(summary)}")
    record_property("twenty_thousand_images", timings)
    assert index["load_ms"] < PAGE_LOAD_LIMIT_MS
    assert tab.problems == []
    tab.close()
