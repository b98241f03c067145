"""Fault markers written in prompts (`[[status:NNN]]`, `[[flaky:N]]`, `[[fault:...]]`,
`[[kontext:...]]`): read here into one `Markers` value, so a test in any process, through any
client, can ask for a fault without a side channel to the server.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

_MARKER_RE = re.compile(
    r"\[\[\s*(status|flaky|fault|kontext)\s*:\s*([^\]]*?)\s*\]\]", re.IGNORECASE
)
_FAULT_MODES = ("drop", "truncate", "garbage", "html", "json-no-images")
_MAX_SLOW_S = 600.0


@dataclass(frozen=True)
class Markers:
    status: int | None = None
    flaky: int = 0
    mode: str | None = None
    slow_s: float = 0.0
    kontext: str | None = None  # "request-moderated" or "error"
    not_found_first: int = 0


def parse_markers(prompt: str) -> Markers:
    """Markers live in the prompt so any client, in any process, can trigger a fault."""
    status: int | None = None
    flaky = 0
    mode: str | None = None
    slow_s = 0.0
    kontext: str | None = None
    not_found_first = 0
    for kind, raw in _MARKER_RE.findall(prompt):
        kind, value = kind.lower(), raw.lower()
        if kind == "status" and value.isdigit() and 400 <= int(value) <= 599 and status is None:
            status = int(value)
        elif kind == "flaky" and value.isdigit():
            flaky = int(value)
        elif kind == "fault" and value.startswith("slow="):
            with contextlib.suppress(ValueError):
                slow_s = min(max(float(value[5:]), 0.0), _MAX_SLOW_S)
        elif kind == "fault" and value in _FAULT_MODES and mode is None:
            mode = value
        elif kind == "kontext" and value.startswith("not-found-first="):
            with contextlib.suppress(ValueError):
                not_found_first = max(int(value.partition("=")[2]), 0)
        elif kind == "kontext" and value in ("request-moderated", "error") and kontext is None:
            kontext = value
    return Markers(
        status=status,
        flaky=flaky,
        mode=mode,
        slow_s=slow_s,
        kontext=kontext,
        not_found_first=not_found_first,
    )
