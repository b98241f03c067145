"""Flow parameters of any size: what would not fit in a flow run travels as a file instead.

The Prefect server refuses flow-run parameters over 512 KB of JSON (a 422, after printing them
back whole), so `generate_images(prompts=<100,000 prompts>)`, 99 prompts of 10,000 characters or
one Kontext edit with a 626 KB data URI could not start. What counts is the size of *all* the
parameters, so that is what is measured: before the flow run is created, when the call's
parameters pass `STAGE_ABOVE_BYTES` (half the cap, a margin for Prefect's own encoding), the
biggest stageable ones are written as files, largest first, until the rest fits:

- `prompts` (in flows with a `staged_prompts` parameter) become `prompts.jsonl`, and the run gets
  `prompts=[]` and `staged_prompts=<its URI>`;
- an `input_images` list becomes `input_images.jsonl` (one JSON string a line), and the run gets
  `input_images=<its URI>`, which `images_in.list_input_images` reads back as the same list.

The files go under the destination's `runs/<stamp>-staged-<id>/` folder, where the Prefect UI's
readable parameters point. A dry run writes nothing into its destination (which may be read-only),
so it stages into a private temporary folder instead, removed when the call returns.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flux_flows.planning import layout
from flux_flows.planning.sources import normalize_prompts
from flux_flows.settings import DEFAULT_DESTINATION
from flux_flows.storage import open_storage

__all__ = [
    "PREFECT_PARAMETERS_CAP",
    "STAGED_INPUT_IMAGES_NAME",
    "STAGED_PARAMETER",
    "STAGE_ABOVE_BYTES",
    "parameters_size",
    "staged_arguments",
]

PREFECT_PARAMETERS_CAP = 512 * 1024  # the Prefect server's limit on a flow run's parameters
STAGE_ABOVE_BYTES = 256 * 1024  # half the cap: Prefect's encoding differs from ours a little
STAGED_PARAMETER = "staged_prompts"
STAGED_INPUT_IMAGES_NAME = "input_images.jsonl"


def _jsonable(value: Any) -> Any:
    """How Prefect would write a parameter json.dumps cannot: models as their JSON, else text."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        with contextlib.suppress(Exception):
            return dump(mode="json")
    return str(value)


def parameters_size(arguments: dict[str, Any]) -> int:
    """The bytes of the parameters' JSON, as the flow run would carry them."""
    return len(json.dumps(arguments, default=_jsonable).encode("utf-8"))


def _json_lines(prompts: Sequence[Any]) -> bytes:
    rows = normalize_prompts(prompts)  # a bad prompt is refused here, named by its position
    return b"".join(json.dumps(row.fields, default=str).encode("utf-8") + b"\n" for row in rows)


def _image_lines(refs: Sequence[Any]) -> bytes:
    from flux_flows.inputs.images import normalize_reference

    lines = []
    for ref in refs:
        if not isinstance(ref, str):
            raise TypeError(f"input_images must hold strings, got {type(ref).__name__}")
        lines.append(json.dumps(normalize_reference(ref)).encode("utf-8") + b"\n")
    return b"".join(lines)


def _stageable(signature: inspect.Signature, arguments: dict[str, Any]) -> list[str]:
    """The parameters this call could send as files instead."""
    names = []
    prompts = arguments.get("prompts")
    if STAGED_PARAMETER in signature.parameters and isinstance(prompts, list | tuple) and prompts:
        names.append("prompts")
    if "input_images" in signature.parameters and isinstance(
        arguments.get("input_images"), list | tuple
    ):
        names.append("input_images")
    return names


class _Stager:
    """Writes staged files: into the destination's runs/ folder, or (dry run) a temporary one."""

    def __init__(self, arguments: dict[str, Any], folder: str) -> None:
        self.arguments = arguments
        self.folder = folder
        self.temporary: Path | None = None
        self._storage: Any = None

    def put(self, name: str, body: bytes) -> str:
        if self.arguments.get("dry_run"):
            if self.temporary is None:
                self.temporary = Path(tempfile.mkdtemp(prefix="flux-flows-staged-"))  # 0700
            path = self.temporary / self.folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            return str(path)
        if self._storage is None:
            self._storage = open_storage(
                self.arguments.get("destination", DEFAULT_DESTINATION),
                aws_credentials=self.arguments.get("aws_credentials"),
            )
        key = f"{layout.RUNS}{self.folder}/{name}"
        return str(self._storage.put(key, body, content_type="application/x-ndjson"))


def _stage(arguments: dict[str, Any], name: str, stager: _Stager) -> None:
    if name == "prompts":
        uri = stager.put("prompts.jsonl", _json_lines(arguments["prompts"]))
        arguments["prompts"] = []
        arguments[STAGED_PARAMETER] = uri
    else:
        arguments["input_images"] = stager.put(
            STAGED_INPUT_IMAGES_NAME, _image_lines(arguments["input_images"])
        )


@contextlib.contextmanager
def staged_arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The call's arguments, with the parameters too big for a flow run replaced by files.

    Use around the call: a dry run's temporary files are removed when the block ends. Raises
    ValueError, before writing anything, when what cannot be staged is over Prefect's cap by
    itself.
    """
    signature = inspect.signature(fn)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:  # a wrong call: Prefect says what is wrong with it
        bound = None
    size = parameters_size(bound.arguments) if bound is not None else 0
    if bound is None or size <= STAGE_ABOVE_BYTES:
        yield args, kwargs
        return
    arguments = bound.arguments
    sizes = {name: parameters_size({name: value}) for name, value in arguments.items()}
    stageable = _stageable(signature, arguments)
    rest = parameters_size({k: v for k, v in arguments.items() if k not in stageable})
    if rest > PREFECT_PARAMETERS_CAP:  # refused before anything is written
        biggest = max((k for k in arguments if k not in stageable), key=sizes.__getitem__)
        raise ValueError(
            f"the parameters of this flow run are {size // 1024} KB of JSON, over Prefect's cap "
            f"of {PREFECT_PARAMETERS_CAP // 1024} KB even without the ones sent as files, and "
            f"{biggest!r} ({sizes[biggest] // 1024} KB, the largest) cannot be sent as a file: "
            "pass less in it"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    stager = _Stager(arguments, f"{stamp}-staged-{uuid.uuid4().hex[:8]}")
    try:
        for name in sorted(stageable, key=sizes.__getitem__, reverse=True):
            if size <= STAGE_ABOVE_BYTES:
                break
            _stage(arguments, name, stager)
            size = parameters_size(arguments)
        yield bound.args, bound.kwargs
    finally:
        if stager.temporary is not None:
            shutil.rmtree(stager.temporary, ignore_errors=True)
