"""Reading prompt sources: text, CSV and JSONL files, local or in S3, and in-memory lists.

A nightly batch reads a file somebody else wrote, so every problem is reported with the file and
line it sits on, before any image is paid for. Values are passed on as found (CSV cells stay
strings); `ImageRequest` converts and validates them later with messages that name the field.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from flux_flows.errors import PromptSourceError
from flux_flows.planning.rows import (
    ALLOWED_FIELDS,
    OVERRIDE_FIELDS,
    SUPPORTED_EXTENSIONS,
    PromptRow,
)
from flux_flows.planning.tables import iter_parquet
from flux_flows.storage import (
    IsAFolderError,
    NotFoundError,
    ReadError,
    is_s3_uri,
    iter_uri_lines,
    split_s3_uri,
)

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials

    from flux_flows.planning.templates import TableSpec

__all__ = [
    "ALLOWED_FIELDS",
    "OVERRIDE_FIELDS",
    "SUPPORTED_EXTENSIONS",
    "PromptRow",
    "iter_prompts",
    "normalize_prompts",
    "read_prompts",
]

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


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")
_LINE_END = re.compile(r"\r\n|\r|\n")


def _parse_txt(lines: Iterable[str], name: str, table: TableSpec | None) -> Iterator[PromptRow]:
    for number, line in enumerate(lines, start=1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            where = f"{name} line {number}"
            yield (
                table.shape({"prompt": prompt}, where)
                if table
                else PromptRow({"prompt": prompt}, where)
            )


def _parse_jsonl(lines: Iterable[str], name: str, table: TableSpec | None) -> Iterator[PromptRow]:
    for number, line in enumerate(lines, start=1):
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
        if table is not None:
            yield table.shape(value, where)
        else:
            yield PromptRow(_check_fields(value, where, PromptSourceError), where)


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


def _table_header(header: list[str], name: str, table: TableSpec) -> list[str]:
    """With a template or kept columns, any column may be there; request fields' names are
    matched without case, as in `_csv_header`."""
    columns = [
        c.strip().lower() if c.strip().lower() in ALLOWED_FIELDS else c.strip() for c in header
    ]
    duplicated = sorted({c for c in columns if c and columns.count(c) > 1})
    if duplicated:
        raise PromptSourceError(
            f"{name} line 1: column {', '.join(map(repr, duplicated))} appears twice"
        )
    table.check_header(columns, f"{name} line 1")
    return columns


def _csv_row(
    columns: list[str], cells: list[str], where: str, need_prompt: bool = True
) -> dict[str, Any]:
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
    if need_prompt and "prompt" not in fields:
        raise PromptSourceError(f"{where}: the prompt is empty")
    return fields


def _parse_csv(lines: Iterable[str], name: str, table: TableSpec | None) -> Iterator[PromptRow]:
    """Strict CSV: an unclosed quote is an error, not a prompt swallowing the rest of the file."""
    reader = csv.reader(lines, strict=True)
    columns: list[str] | None = None
    start = 1  # a quoted cell may span lines: report the line the row starts on
    try:
        for cells in reader:
            where = f"{name} line {start}"
            start = reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if columns is None:
                columns = (
                    _csv_header(cells, name) if table is None else _table_header(cells, name, table)
                )
                continue
            if table is not None:
                yield table.shape(_csv_row(columns, cells, where, need_prompt=False), where)
            else:
                yield PromptRow(_csv_row(columns, cells, where), where)
    except csv.Error as exc:
        raise PromptSourceError(_csv_error(name, start, reader.line_num, exc)) from exc


def _csv_error(name: str, start: int, end: int, exc: csv.Error) -> str:
    message = f"{name} line {start}: malformed CSV ({exc})"
    if end > start:
        message += f" in the row spanning lines {start}-{end}; look for an unclosed quote"
    return message


_Parser = Callable[[Iterable[str], str, "TableSpec | None"], Iterator[PromptRow]]
_PARSERS: dict[str, _Parser] = {
    ".txt": _parse_txt,
    ".csv": _parse_csv,
    ".jsonl": _parse_jsonl,
    ".ndjson": _parse_jsonl,
}


# --------------------------------------------------------------------------------------------
# Sources: path or s3:// -> a stream of lines
# --------------------------------------------------------------------------------------------


def _parser_for(source: str) -> _Parser:
    suffix = PurePosixPath(source).suffix.lower()
    parser = _PARSERS.get(suffix)
    if parser is None:
        raise PromptSourceError(
            f"{source}: unsupported prompt file type {suffix or '(no extension)'!r}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return parser


def _check_s3_source(source: str) -> None:
    if is_s3_uri(source):
        bucket, key = split_s3_uri(source)
        if not bucket or not key or key.endswith("/"):
            raise PromptSourceError(
                f"{source}: an S3 prompt source must name an object, s3://BUCKET/KEY"
            )


def _raw_lines(source: str, aws_credentials: Any) -> Iterator[bytes]:
    """Storage reads as a stream; the wording stays this module's, the one users of prompt
    files know."""
    try:
        yield from iter_uri_lines(source, aws_credentials=aws_credentials, keepends=True)
    except NotFoundError as exc:
        raise PromptSourceError(f"prompt file {source} does not exist") from exc
    except IsAFolderError as exc:
        raise PromptSourceError(f"prompt source {source} is a folder, not a file") from exc
    except ReadError as exc:
        what = "prompt source" if is_s3_uri(source) else "prompt file"
        raise PromptSourceError(f"cannot read {what} {source}: {exc.reason}") from exc


def _text_lines(raw: Iterable[bytes], source: str) -> Iterator[str]:
    """Lines split on \\n, \\r\\n and \\r only (so line numbers match what an editor shows), each
    with its end, from UTF-8 with or without the BOM that Excel and Notepad write.

    Bad bytes and NUL characters (the mark of UTF-16 text read as UTF-8) name their line.
    Neither \\r nor \\n occurs inside a UTF-8 sequence, so each piece decodes on its own.
    """
    number = 0
    for position, data in enumerate(raw):
        if position == 0 and data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8) :]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = number + 1 + len(_LINE_END.findall(data[: exc.start].decode("utf-8")))
            byte = data[exc.start : exc.start + 1].hex()
            raise PromptSourceError(
                f"{source} line {line}: byte 0x{byte} is not UTF-8; save the file as UTF-8"
            ) from exc
        for line in _LINE.findall(text):
            number += 1
            if "\x00" in line:
                raise PromptSourceError(
                    f"{source} line {number}: contains a NUL character (a UTF-16 file?); save "
                    "the file as UTF-8"
                )
            yield line


def iter_prompts(
    source: str | Path,
    *,
    aws_credentials: AwsCredentials | None = None,
    table: TableSpec | None = None,
) -> Iterator[PromptRow]:
    """`read_prompts` as a stream: each row is parsed as its line is read, so a file of any
    length costs one row's memory, and a run holds no row once its plan is made.

    The source's name and file type are checked now, before anything is read (a typo in the
    extension costs no S3 round trip); problems inside the file are raised as they are reached.
    `table` (`planning.templates.table_spec`) renders each row's prompt from a template and keeps
    the columns it names; `.parquet` files are read by `planning.tables`.
    """
    if not isinstance(source, str | Path) or not str(source).strip():
        raise PromptSourceError("prompt source is empty: pass a file path or s3://BUCKET/KEY")
    source = str(source).strip()
    if is_s3_uri(source):
        source = "s3://" + source[len("s3://") :]
    _check_s3_source(source)
    if PurePosixPath(source).suffix.lower() == ".parquet":
        return iter_parquet(source, aws_credentials=aws_credentials, table=table)
    parser = _parser_for(source)
    return _rows_of(parser, source, aws_credentials, table)


def _rows_of(
    parser: _Parser, source: str, aws_credentials: Any, table: TableSpec | None = None
) -> Iterator[PromptRow]:
    found = False
    lines = _text_lines(_raw_lines(source, aws_credentials), source)
    for row in parser(lines, source, table):
        found = True
        yield row
    if not found:
        raise PromptSourceError(f"no prompts in {source}")


def read_prompts(
    source: str | Path,
    *,
    aws_credentials: AwsCredentials | None = None,
    table: TableSpec | None = None,
) -> list[PromptRow]:
    """Rows from a `.txt`, `.csv`, `.jsonl`/`.ndjson` or `.parquet` file, path or `s3://` URI.

    Rows are reported as "<source> line N". A batch reads its file with `iter_prompts`.
    """
    return list(iter_prompts(source, aws_credentials=aws_credentials, table=table))


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


def normalize_prompts(
    prompts: Sequence[str | Mapping[str, Any] | BaseModel], table: TableSpec | None = None
) -> list[PromptRow]:
    """Rows from what a flow caller passes: strings, dicts of overrides, or ImageRequest models.

    A bare string is refused rather than iterated, which would turn "a cat" into five prompts.
    With `table`, each dict is a table row (`planning.templates`) and a string is its `prompt`.
    """
    if isinstance(prompts, str | bytes | Mapping | BaseModel) or not isinstance(prompts, Iterable):
        raise TypeError(
            f"prompts must be a list, e.g. ['a red fox', {{'prompt': 'a cat', 'seed': 7}}]; got "
            f"{type(prompts).__name__} (wrap a single prompt in a list)"
        )
    if table is not None:
        return [
            table.shape(_table_item(item, f"prompts[{i}]"), f"prompts[{i}]")
            for i, item in enumerate(prompts)
        ]
    return [
        PromptRow(_normalize_one(item, f"prompts[{i}]"), f"prompts[{i}]")
        for i, item in enumerate(prompts)
    ]


def _table_item(item: object, where: str) -> Mapping[Any, Any]:
    if isinstance(item, str):
        return {"prompt": item}
    if isinstance(item, BaseModel):
        return item.model_dump()
    if isinstance(item, Mapping):
        return item
    raise TypeError(
        f"{where}: expected a dict of columns or a prompt string, got {type(item).__name__}"
    )
