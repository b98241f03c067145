"""Reading prompt sources: text, CSV and JSONL files, local or in S3, and in-memory lists.

A nightly batch reads a file somebody else wrote, so every problem is reported with the file and
line it sits on, before any image is paid for. Values are passed on as found (CSV cells stay
strings); `ImageRequest` converts and validates them later with messages that name the field.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel

from flux_flows.errors import PromptSourceError
from flux_flows.models import ImageRequest
from flux_flows.storage import (
    IsAFolderError,
    NotFoundError,
    ReadError,
    is_s3_uri,
    read_uri,
    split_s3_uri,
)

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials

__all__ = [
    "ALLOWED_FIELDS",
    "OVERRIDE_FIELDS",
    "SUPPORTED_EXTENSIONS",
    "PromptRow",
    "normalize_prompts",
    "read_prompts",
]

# Per-prompt overrides are exactly the request fields besides the prompt, so a new field on
# ImageRequest becomes a valid column without touching this module.
OVERRIDE_FIELDS: tuple[str, ...] = tuple(
    name for name in ImageRequest.model_fields if name != "prompt"
)
ALLOWED_FIELDS: tuple[str, ...] = ("prompt", "id", *OVERRIDE_FIELDS)
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".txt", ".csv", ".jsonl", ".ndjson")


class PromptRow(NamedTuple):
    """One prompt with its overrides, and where it came from for error messages.

    `index` and `variant` are set only for a replayed record, which keeps its place in the
    manifest it came from.
    """

    fields: dict[str, Any]
    where: str
    index: int | None = None
    variant: int | None = None


# --------------------------------------------------------------------------------------------
# Field checks shared by JSONL and in-memory prompts
# --------------------------------------------------------------------------------------------


def _allowed_list() -> str:
    return ", ".join(ALLOWED_FIELDS)


def _check_fields(
    raw: Mapping[Any, Any], where: str, error: Callable[[str], Exception]
) -> dict[str, Any]:
    """Drop `None` (= not set), refuse unknown keys and a missing, non-text or blank prompt."""
    unknown = sorted(str(k) for k in raw if k not in ALLOWED_FIELDS)
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise error(f"{where}: unknown field {names}; allowed: {_allowed_list()}")
    fields = {str(k): v for k, v in raw.items() if v is not None}
    prompt = fields.get("prompt")
    if prompt is None:
        raise error(f"{where}: no 'prompt'")
    if not isinstance(prompt, str):
        kind = type(prompt).__name__
        raise error(f"{where}: 'prompt' must be a string, got {kind}")
    if not prompt.strip():
        raise error(f"{where}: 'prompt' is empty")
    return fields


# --------------------------------------------------------------------------------------------
# Parsers: text -> rows
# --------------------------------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    """Split on \\n, \\r\\n and \\r only, so line numbers match what an editor shows."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _parse_txt(text: str, name: str) -> list[PromptRow]:
    rows = []
    for number, line in enumerate(_lines(text), start=1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            rows.append(PromptRow({"prompt": prompt}, f"{name} line {number}"))
    return rows


def _parse_jsonl(text: str, name: str) -> list[PromptRow]:
    rows = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSourceError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from exc
        if not isinstance(value, dict):
            raise PromptSourceError(
                f'{where}: expected a JSON object such as {{"prompt": "..."}}, got '
                f"{_json_kind(value)}"
            )
        rows.append(PromptRow(_check_fields(value, where, PromptSourceError), where))
    return rows


def _json_kind(value: object) -> str:
    kinds = {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return kinds.get(type(value), "null" if value is None else type(value).__name__)


def _csv_header(header: list[str], name: str) -> list[str]:
    columns = [cell.strip().lower() for cell in header]
    if "prompt" not in columns:
        raise PromptSourceError(
            f"{name} line 1: the header has no 'prompt' column (found: "
            f"{', '.join(c or '<empty>' for c in columns)}); the first row must name the columns"
        )
    unknown = [c for c in columns if c and c not in ALLOWED_FIELDS]
    if unknown:
        raise PromptSourceError(
            f"{name} line 1: unknown column {', '.join(map(repr, unknown))}; allowed: "
            f"{_allowed_list()}"
        )
    duplicated = sorted({c for c in columns if c and columns.count(c) > 1})
    if duplicated:
        raise PromptSourceError(
            f"{name} line 1: column {', '.join(map(repr, duplicated))} appears twice"
        )
    return columns


def _csv_row(columns: list[str], cells: list[str], where: str) -> dict[str, Any]:
    if len(cells) > len(columns):
        raise PromptSourceError(
            f"{where}: {len(cells)} cells but the header has {len(columns)} columns "
            "(quote cells that contain commas)"
        )
    fields: dict[str, Any] = {}
    for column, cell in zip(columns, cells, strict=False):
        value = cell.strip()
        if not value:
            continue
        if not column:
            raise PromptSourceError(f"{where}: value {value!r} is under a column with no name")
        fields[column] = value
    if "prompt" not in fields:
        raise PromptSourceError(f"{where}: the prompt is empty")
    return fields


def _parse_csv(text: str, name: str) -> list[PromptRow]:
    """Strict CSV: an unclosed quote is an error, not a prompt swallowing the rest of the file."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[PromptRow] = []
    columns: list[str] | None = None
    start = 1  # a quoted cell may span lines: report the line the row starts on
    try:
        for cells in reader:
            where = f"{name} line {start}"
            start = reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if columns is None:
                columns = _csv_header(cells, name)
                continue
            rows.append(PromptRow(_csv_row(columns, cells, where), where))
    except csv.Error as exc:
        raise PromptSourceError(_csv_error(name, start, reader.line_num, exc)) from exc
    return rows


def _csv_error(name: str, start: int, end: int, exc: csv.Error) -> str:
    message = f"{name} line {start}: malformed CSV ({exc})"
    if end > start:
        message += f" in the row spanning lines {start}-{end}; look for an unclosed quote"
    return message


_PARSERS: dict[str, Callable[[str, str], list[PromptRow]]] = {
    ".txt": _parse_txt,
    ".csv": _parse_csv,
    ".jsonl": _parse_jsonl,
    ".ndjson": _parse_jsonl,
}


# --------------------------------------------------------------------------------------------
# Sources: path or s3:// -> bytes -> text
# --------------------------------------------------------------------------------------------


def _parser_for(source: str) -> Callable[[str, str], list[PromptRow]]:
    suffix = PurePosixPath(source).suffix.lower()
    parser = _PARSERS.get(suffix)
    if parser is None:
        raise PromptSourceError(
            f"{source}: unsupported prompt file type {suffix or '(no extension)'!r}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return parser


def _read_source(source: str, aws_credentials: Any) -> bytes:
    """Storage reads; the wording stays this module's, the one users of prompt files know."""
    if is_s3_uri(source):
        bucket, key = split_s3_uri(source)
        if not bucket or not key or key.endswith("/"):
            raise PromptSourceError(
                f"{source}: an S3 prompt source must name an object, s3://BUCKET/KEY"
            )
    try:
        return read_uri(source, aws_credentials=aws_credentials, action="read prompts from")
    except NotFoundError as exc:
        raise PromptSourceError(f"prompt file {source} does not exist") from exc
    except IsAFolderError as exc:
        raise PromptSourceError(f"prompt source {source} is a folder, not a file") from exc
    except ReadError as exc:
        what = "prompt source" if is_s3_uri(source) else "prompt file"
        raise PromptSourceError(f"cannot read {what} {source}: {exc.reason}") from exc


def _decode(data: bytes, source: str) -> str:
    """UTF-8, with or without the BOM that Excel and Notepad write; name the first bad line.

    NUL characters are refused here because they are the mark of UTF-16 text read as UTF-8.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        byte = data[exc.start : exc.start + 1].hex()
        raise PromptSourceError(
            f"{source} line {line}: byte 0x{byte} is not UTF-8; save the file as UTF-8"
        ) from exc
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise PromptSourceError(
            f"{source} line {line}: contains a NUL character (a UTF-16 file?); save the file as "
            "UTF-8"
        )
    return text


def read_prompts(
    source: str | Path, *, aws_credentials: AwsCredentials | None = None
) -> list[PromptRow]:
    """Rows from a `.txt`, `.csv` or `.jsonl`/`.ndjson` file, given as a path or `s3://` URI.

    The file type is checked before anything is read, so a typo in the extension does not cost
    an S3 round trip. Rows are reported as "<source> line N".
    """
    if not isinstance(source, str | Path) or not str(source).strip():
        raise PromptSourceError("prompt source is empty: pass a file path or s3://BUCKET/KEY")
    source = str(source).strip()
    if is_s3_uri(source):
        source = "s3://" + source[len("s3://") :]
    parser = _parser_for(source)
    data = _read_source(source, aws_credentials)
    rows = parser(_decode(data, source), source)
    if not rows:
        raise PromptSourceError(f"no prompts in {source}")
    return rows


# --------------------------------------------------------------------------------------------
# In-memory prompts
# --------------------------------------------------------------------------------------------


def _normalize_one(item: object, where: str) -> dict[str, Any]:
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{where}: the prompt is empty")
        return {"prompt": item}
    if isinstance(item, BaseModel):
        item = item.model_dump()
    if isinstance(item, Mapping):
        return _check_fields(item, where, ValueError)
    raise TypeError(
        f"{where}: expected a prompt string, a dict with 'prompt' or an ImageRequest, got "
        f"{type(item).__name__}"
    )


def normalize_prompts(prompts: Sequence[str | Mapping[str, Any] | BaseModel]) -> list[PromptRow]:
    """Rows from what a flow caller passes: strings, dicts of overrides, or ImageRequest models.

    A bare string is refused rather than iterated, which would turn "a cat" into five prompts.
    """
    if isinstance(prompts, str | bytes | Mapping | BaseModel) or not isinstance(prompts, Iterable):
        raise TypeError(
            f"prompts must be a list, e.g. ['a red fox', {{'prompt': 'a cat', 'seed': 7}}]; got "
            f"{type(prompts).__name__} (wrap a single prompt in a list)"
        )
    return [
        PromptRow(_normalize_one(item, f"prompts[{i}]"), f"prompts[{i}]")
        for i, item in enumerate(prompts)
    ]
