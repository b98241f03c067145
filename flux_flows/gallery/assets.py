"""The page's only CSS and scripts, and the Content-Security-Policy that admits exactly them.

No network: inline CSS and JS only, and a CSP that allows nothing else to run or load except
images, so a page opened from a folder or a static-site bucket works offline, and even a missed
escape could not run anything. Off-screen cards use `content-visibility: auto` so 1,000 cards
are not laid out at once.
"""

from __future__ import annotations

import base64
import hashlib

CSS = """
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
.pager{display:flex;flex-wrap:wrap;gap:4px 14px;margin:8px 0 0}
.pager .here{color:var(--muted)}
main.index{display:block;max-width:960px;padding:4px 20px 32px}
.index h2{font-size:16px;margin:18px 0 6px}
.index ol{margin:0;padding-left:28px}
.index li{margin:3px 0}
.meta{color:var(--muted)}
.g-ERROR h2{color:var(--bad)}.g-CONTENT_FILTERED h2{color:var(--warn)}
"""

# Registered in <head>, before any <img> exists, so no load error can fire before it listens.
FALLBACK_JS = """
document.addEventListener("error", (event) => {
  const img = event.target;
  if (img instanceof HTMLImageElement && img.dataset.full) {
    const full = img.dataset.full;
    delete img.dataset.full;
    img.src = full;
  }
}, true);
"""

FILTER_JS = """
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


def _csp(*, images: str, scripts: tuple[str, ...]) -> str:
    """Nothing may load but images, and only these exact scripts and styles may run.

    An injected <script>, inline handler or style attribute is refused by the browser even if
    escaping failed.
    """
    script_src = " ".join(_csp_hash(script) for script in scripts) or "'none'"
    return "; ".join(
        [
            "default-src 'none'",
            f"img-src {images}",
            f"style-src {_csp_hash(CSS)}",
            f"script-src {script_src}",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )


CSP = _csp(images="* data: blob: file:", scripts=(FALLBACK_JS, FILTER_JS))
# The index of a paged sheet shows no image and runs no script: it may do neither.
INDEX_CSP = _csp(images="'none'", scripts=())
