"""Prompt lists of any size: a big list travels as a file in the destination, not as a parameter.

The Prefect server refuses flow-run parameters over 512 KB (and would print them back whole), so
`generate_images(prompts=<100,000 prompts>)` could not start. Before the flow run is created, a
list whose JSON passes `STAGE_ABOVE_BYTES` is written as JSONL under the destination's `runs/`
folder and the run gets `staged_prompts=<its URI>` instead: the Prefect UI still shows readable
parameters, and says where the prompts are.
"""

from __future__ import annotations

import inspect
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from flux_flows import layout
from flux_flows.prompts import normalize_prompts
from flux_flows.settings import DEFAULT_DESTINATION
from flux_flows.storage import open_storage

STAGE_ABOVE_BYTES = 256 * 1024  # half the server's cap: the other parameters need room too
STAGED_PARAMETER = "staged_prompts"


def _json_lines(prompts: Sequence[Any]) -> bytes:
    rows = normalize_prompts(prompts)  # a bad prompt is refused here, named by its position
    return b"".join(json.dumps(row.fields, default=str).encode("utf-8") + b"\n" for row in rows)


def stage_large_prompts(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments, with a too-large `prompts` list replaced by its staged file."""
    signature = inspect.signature(fn)
    if STAGED_PARAMETER not in signature.parameters:
        return args, kwargs
    bound = signature.bind_partial(*args, **kwargs)
    prompts = bound.arguments.get("prompts")
    if not isinstance(prompts, list | tuple) or len(prompts) < 100:
        return args, kwargs
    body = _json_lines(prompts)
    if len(body) <= STAGE_ABOVE_BYTES:
        return args, kwargs
    destination = bound.arguments.get("destination", DEFAULT_DESTINATION)
    storage = open_storage(destination, aws_credentials=bound.arguments.get("aws_credentials"))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    key = f"{layout.RUNS}{stamp}-staged-{uuid.uuid4().hex[:8]}/prompts.jsonl"
    uri = storage.put(key, body, content_type="application/x-ndjson")
    bound.arguments["prompts"] = []
    bound.arguments[STAGED_PARAMETER] = uri
    return bound.args, bound.kwargs
