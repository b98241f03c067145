"""The files a work-pool chunk run shares with its batch, checked before they are believed.

Anyone who can write to the destination can rewrite `runs/<run>/chunks/`, so neither side takes
the other's file on trust:
- the batch sends the SHA-256 of each requests file it wrote as the chunk run's
  `requests_sha256`; the chunk run checks it before any spend (`read_requests`) and refuses a
  file that differs (`ChunkFileChanged`);
- the batch accepts a result (`read_results`) only for an image planned in that chunk, and a
  SUCCESS or CONTENT_FILTERED one only if it names the object the plan expects and that object
  exists now; anything else, and any planned image without a result, becomes an ERROR record
  saying why. The results file is read up to a size bounded by the chunk's length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from flux_flows.errors import StorageError
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.planning import layout
from flux_flows.rendering.one_image import RenderResult
from flux_flows.storage import Storage, TooLargeError, iter_uri_lines

if TYPE_CHECKING:
    from flux_flows.planning.plan import PlannedImage

logger = logging.getLogger("flux_flows.rendering.chunk_files")

NDJSON = "application/x-ndjson"
# A chunk's results file is read whole, up to this much per planned image (one result line is
# ~0.5 KB; its error text a few KB at most) plus RESULTS_SLACK_BYTES: a bigger one is not a
# chunk run's and its images are ERROR records.
RESULT_LINE_MAX_BYTES = 16 * 1024
RESULTS_SLACK_BYTES = 64 * 1024
# How many dropped cache keys a warning names (the count is always given).
NAMED_IN_WARNING = 5
# HEADs at once when the batch checks that a chunk's stored images exist.
EXISTS_CHECKS_AT_ONCE = 8


class ChunkFileChanged(RuntimeError):
    """A chunk run's requests file is not the one its batch wrote: nothing is rendered."""


def _log() -> Any:
    """The flow run's logger inside a flow run, the module's outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def results_key(chunk_key: str) -> str:
    return chunk_key.removesuffix(".jsonl") + ".results.jsonl"


def read_results(
    storage: Storage, chunk_key: str, chunk: Sequence[PlannedImage], state: Any
) -> list[RenderResult]:
    """One result per image planned in the chunk, each checked against the plan and the
    destination (see the module's docstring); never raises for what the file says.

    If the run died without writing its results (or they are not a chunk run's), its images are
    ERROR records: what it stored before dying is found by the next run's listing, never paid
    twice.
    """
    planned = {p.cache_key: p for p in chunk}
    key = results_key(chunk_key)
    where = storage.uri_for(key)
    limit = RESULTS_SLACK_BYTES + RESULT_LINE_MAX_BYTES * len(planned)
    ended = _ended(state)
    try:
        body = storage.get(key, max_bytes=limit)
        reported = [_result_of_line(line) for line in body.splitlines() if line.strip()]
    except TooLargeError as exc:
        error = (
            f"the chunk's results file {where} is {exc.size} bytes, over the {limit} that "
            f"{len(planned)} results can take: not read; its flow run ended {ended}"
        )
        return _all_failed(planned, error)
    except (StorageError, OSError):
        name, why = _ended_parts(state)
        return _all_failed(planned, f"the chunk's flow run ended {name} without results{why}")
    except (ValueError, RecursionError) as exc:
        error = (
            f"the chunk's results file {where} is not a chunk run's ({exc}); its flow run "
            f"ended {ended}"
        )
        return _all_failed(planned, error)
    accepted = _first_planned(reported, planned, where)
    checked = _verify(storage, planned, accepted, where)
    missing = f"the chunk's results file {where} has no result for it; its flow run ended {ended}"
    return [checked.get(k) or _failed(k, missing) for k in planned]


def _first_planned(
    reported: list[RenderResult], planned: dict[str, PlannedImage], where: str
) -> dict[str, RenderResult]:
    """Each planned image's first result; results for images the chunk did not plan, and
    repeats, are dropped with a warning (a results file anyone could have written)."""
    accepted: dict[str, RenderResult] = {}
    unplanned: list[str] = []
    repeated = 0
    for result in reported:
        if result.cache_key not in planned:
            unplanned.append(result.cache_key)
        elif result.cache_key in accepted:
            repeated += 1
        else:
            accepted[result.cache_key] = result
    if unplanned:
        named = ", ".join(repr(k[:40]) for k in unplanned[:NAMED_IN_WARNING])
        more = (
            f" and {len(unplanned) - NAMED_IN_WARNING} more"
            if len(unplanned) > NAMED_IN_WARNING
            else ""
        )
        _log().warning(
            "%s: dropped %d result(s) for images this chunk did not plan (%s%s)",
            where, len(unplanned), named, more,
        )  # fmt: skip
    if repeated:
        _log().warning(
            "%s: dropped %d repeated result(s), kept each image's first", where, repeated
        )
    return accepted


def _ended_parts(state: Any) -> tuple[str, str]:
    """(the chunk run's final state's name, ": the reason Prefect gives" or "" if it completed)."""
    name = getattr(state, "name", None) or "unknown"
    message = getattr(state, "message", None)
    return name, f": {message}" if message and name != "Completed" else ""


def _ended(state: Any) -> str:
    """How the chunk run ended, with the reason Prefect gives when it did not complete."""
    return "".join(_ended_parts(state))


def _failed(cache_key: str, error: str) -> RenderResult:
    return RenderResult(cache_key=cache_key, finish_reason=FinishReason.ERROR, error=error)


def _all_failed(planned: dict[str, PlannedImage], error: str) -> list[RenderResult]:
    _log().warning("%s", error)
    return [_failed(k, error) for k in planned]


def _unverified(result: RenderResult, error: str) -> RenderResult:
    """ERROR, saying why; the API calls it reports stay (they were spent), the object goes."""
    return dataclasses.replace(
        result,
        finish_reason=FinishReason.ERROR,
        object_key=None,
        thumbnail=False,
        already_stored=False,
        recovered_from_spill=False,
        taken_by=None,
        error=error,
    )


def _verify(
    storage: Storage,
    planned: dict[str, PlannedImage],
    reported: dict[str, RenderResult],
    where: str,
) -> dict[str, RenderResult]:
    """Each reported result as the batch can vouch for it: a SUCCESS or CONTENT_FILTERED only
    at the object the plan expects, found in the destination now (one HEAD each, a few at
    once); anything else ERROR, saying why."""
    checked, refusals, to_check = _read_claims(storage, planned, reported, where)
    refusals |= _not_found(storage, reported, to_check)
    checked |= {k: reported[k] for k in to_check if k not in refusals}
    checked |= {k: _unverified(reported[k], error) for k, error in refusals.items()}
    if refusals:
        _log().warning("%s: %d result(s) not verified, recorded as ERROR", where, len(refusals))
    return checked


def _read_claims(
    storage: Storage,
    planned: dict[str, PlannedImage],
    reported: dict[str, RenderResult],
    where: str,
) -> tuple[dict[str, RenderResult], dict[str, str], dict[str, str]]:
    """What the results file says, judged without the store: (ERROR results, kept as ERROR;
    why each result wrong on its face is refused; the object each other one must be at)."""
    errors: dict[str, RenderResult] = {}
    refusals: dict[str, str] = {}
    to_check: dict[str, str] = {}  # cache key -> the object the plan expects
    for cache_key, result in reported.items():
        said = result.finish_reason
        if said is FinishReason.ERROR:
            error = result.error or f"the chunk's results file {where} says ERROR, without why"
            errors[cache_key] = dataclasses.replace(
                result, object_key=None, thumbnail=False, error=error
            )
        elif said not in (FinishReason.SUCCESS, FinishReason.CONTENT_FILTERED):
            refusals[cache_key] = (
                f"the chunk's results file {where} says {said.value}, which no chunk run reports"
            )
        elif result.object_key is None:
            kept = f" (kept on its worker at {result.spill_path})" if result.spill_path else ""
            refusals[cache_key] = (
                f"the chunk's results file says {said.value}{kept} but names no object in the "
                f"destination{f': {result.error}' if result.error else ''}"
            )
        elif result.object_key != (expected := layout.image_key(planned[cache_key].request, said)):
            refusals[cache_key] = (
                f"the chunk's results file says {said.value} at {result.object_key[:200]!r}, "
                f"not at {storage.uri_for(expected)} where the plan puts it"
            )
        else:
            to_check[cache_key] = expected
    return errors, refusals, to_check


def _not_found(
    storage: Storage, reported: dict[str, RenderResult], to_check: dict[str, str]
) -> dict[str, str]:
    """Why each result whose object is not in the destination (or cannot be checked) is
    refused; one HEAD each, EXISTS_CHECKS_AT_ONCE at once."""
    if not to_check:
        return {}
    with ThreadPoolExecutor(min(EXISTS_CHECKS_AT_ONCE, len(to_check))) as pool:
        found = dict(zip(to_check, pool.map(_exists(storage), to_check.values()), strict=True))
    refusals: dict[str, str] = {}
    for cache_key, expected in to_check.items():
        there = found[cache_key]
        said_value, uri = reported[cache_key].finish_reason.value, storage.uri_for(expected)
        if there is False:
            refusals[cache_key] = (
                f"the chunk's results file says {said_value} but {uri} does not exist"
            )
        elif there is not True:
            refusals[cache_key] = (
                f"the chunk's results file says {said_value} but {uri} could not be checked ({there})"
            )
    return refusals


def _exists(storage: Storage) -> Callable[[str], bool | str]:
    """storage.exists, or why it could not tell."""

    def exists(key: str) -> bool | str:
        try:
            return storage.exists(key)
        except (StorageError, OSError) as exc:
            return str(exc) or type(exc).__name__

    return exists


def _annotation_types(annotation: str) -> tuple[type, ...] | None:
    """The types a RenderResult field's (string) annotation allows; None: not checked."""
    known: dict[str, tuple[type, ...]] = {
        "str": (str,),
        "int": (int,),
        "bool": (bool,),
        "float": (int, float),
        "None": (type(None),),
        "FinishReason": (FinishReason,),
    }
    allowed: list[type] = []
    for part in str(annotation).split("|"):
        types = known.get(part.strip())
        if types is None:
            return None
        allowed.extend(types)
    return tuple(allowed)


# from_json checks a line's field names, not their values' types: what each may hold.
_RESULT_TYPES = {
    f.name: types
    for f in dataclasses.fields(RenderResult)
    if (types := _annotation_types(str(f.type))) is not None
}


def _result_of_line(line: bytes) -> RenderResult:
    """One line of a results file; ValueError unless each field holds what a chunk run writes
    (a string where a string goes, counts that are whole and not negative, finite numbers)."""
    result = RenderResult.from_json(line)
    for name, types in _RESULT_TYPES.items():
        value = getattr(result, name)
        wrong = not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        if isinstance(value, int | float) and not isinstance(value, bool):
            wrong = wrong or value < 0 or not math.isfinite(value)
        if wrong:
            raise ValueError(f"{name} is {str(value)[:40]!r} in {line[:200]!r}")
    return result


def read_requests(
    storage: Storage, chunk_key: str, expected_sha256: str | None, aws: Any
) -> list[ImageRequest]:
    """The chunk's requests, once its file is known to be the one the batch wrote.

    The file is read twice, as a stream: first only hashed (a file swapped for a huge one is
    refused without being held), then hashed again while parsed (one changed in between is
    refused too). Raises ChunkFileChanged, naming the chunk.
    """
    uri = storage.uri_for(chunk_key)

    def lines() -> Iterator[bytes]:
        return iter_uri_lines(uri, aws_credentials=aws, keepends=True)

    def check(digest: Any, again: bool) -> None:
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256.lower():
            how = "it changed while being read:" if again else "its"
            raise ChunkFileChanged(
                f"chunk {chunk_key}: its requests file {uri} is not the one the batch wrote "
                f"({how} SHA-256 is {digest.hexdigest()}, the batch's {expected_sha256}): "
                "refused, nothing was rendered or paid for"
            )

    if expected_sha256 is None:
        _log().warning(
            "chunk %s: no requests_sha256 given, its requests file is not checked", chunk_key
        )
    else:
        first = hashlib.sha256()
        for line in lines():
            first.update(line)
        check(first, again=False)
    digest = hashlib.sha256()
    requests = []
    for line in lines():
        digest.update(line)
        if line.strip():
            requests.append(ImageRequest.model_validate_json(line))
    check(digest, again=True)
    return requests
