"""How a page reaches the objects it shows: relative links, local file links or signed URLs.

Relative links are computed from the page's own location (`../../thumbs/...` from `runs/<id>/`),
so a page works from a local folder and from a bucket served as a static site; signed URLs only
when the page lives elsewhere (a local page over a private bucket). Only keys of the layout are
ever linked, so a tampered manifest cannot make the page point anywhere else.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from flux_flows.storage import Storage

# An object key this library writes: one folder of the layout, then a plain file name.
_OBJECT_KEY_RE = re.compile(r"^(?:images|filtered|thumbs)/[A-Za-z0-9._-]+$")

Href = Callable[[str], str | None]
"""How a page reaches an object: destination-relative key -> link (relative, file: or signed)."""


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
    return lambda key: relative_link(page_key, key)


def relative_link(from_key: str, to_key: str) -> str:
    """The link from the page stored at `from_key` to the object or page at `to_key`."""
    return quote(posixpath.relpath(to_key, posixpath.dirname(from_key) or "."))


def local_href(root: Path, page_dir: Path) -> Callable[[str], str]:
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
