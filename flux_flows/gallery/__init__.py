"""The contact sheet: a self-contained HTML page that shows what a run produced.

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

A run of more than `PAGE_SIZE` (1,000) images is paged. Its index sits where the single page
would (`runs/<id>/contact-sheet.html`, and a copy at the root that links into the run) and
leads to pages of at most 1,000 cards in `runs/<id>/contact-sheet/`, failures first
(`failed-1.html`, `filtered-1.html`, ..., `images-1.html`, ...).

Modules, one job each: `links` (how a page reaches an object), `assets` (CSS, scripts, CSP),
`cards` (one card per record), `page` (one page), `paging` (which records go on which page),
`index` (the index of a paged sheet), `sheets` (storing a sheet, paged or not), `run_sheets`
(a run's sheet in its destination), `rebuild` (a sheet for an earlier manifest).
"""

from flux_flows.gallery.rebuild import build_gallery
from flux_flows.gallery.run_sheets import write_contact_sheets

__all__ = ["build_gallery", "write_contact_sheets"]
