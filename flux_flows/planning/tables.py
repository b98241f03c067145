"""Parquet prompt files, local or in S3, read a batch of rows at a time (pyarrow, optional).

A Parquet catalogue is read as CSV and JSONL are: one row at a time into `PromptRow`s, with
the same columns (`prompt`, `model`, `aspect_ratio`, `seed`, ..., `id`), so planning a million
rows holds one record batch of the columns it uses, not the file. Only those columns are read:
a 40-column export costs the columns the prompt needs.

Parquet keeps its index (the footer) at the end of the file, so an `s3://` file is first
downloaded to a private temporary file (streamed, up to `S3_PARQUET_MAX_BYTES`), then read
like a local one and deleted. Ranged reads would save the download of unused columns but add an
S3 round trip per column chunk; a prompt table is small next to the images it makes.

Column types are checked as values are read, before anything is paid for: a `seed` column of
floats (what pandas writes for whole numbers with gaps) is taken where each value is whole, and a
NaN or 2.5 is an error naming the row and the column; text where a number belongs is an error too.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flux_flows.errors import PromptSourceError
from flux_flows.planning.rows import PromptRow
from flux_flows.planning.templates import TableSpec
from flux_flows.storage import is_s3_uri, split_s3_uri

__all__ = ["BATCH_ROWS", "PARQUET_EXTRA", "S3_PARQUET_MAX_BYTES", "iter_parquet"]

PARQUET_EXTRA = "pip install 'flux-flows[parquet]'"
BATCH_ROWS = 8192  # rows decoded at once: ~1 MB of short strings per column
S3_PARQUET_MAX_BYTES = 2 * 1024**3  # a catalogue of millions of rows is well under this
_CHUNK = 8 * 1024 * 1024

_INTEGER = ("seed", "num_inference_steps", "safety_tolerance")
_NUMBER = ("guidance_scale",)
_BOOLEAN = ("safety_check", "prompt_upsampling")
_TEXT = ("prompt", "model", "aspect_ratio", "output_format", "input_image")

_Check = Callable[[Any, str], Any]


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PromptSourceError(
            f"reading Parquet prompt files needs pyarrow: {PARQUET_EXTRA}"
        ) from exc
    return pq


def _s3_to_file(source: str, aws_credentials: Any, handle: Any) -> None:
    """Stream the object into `handle`, refusing it by its size before the download."""
    from botocore.exceptions import BotoCoreError, ClientError

    from flux_flows.storage.s3 import explain_s3_error
    from flux_flows.storage.s3_client import get_s3_client

    bucket, key = split_s3_uri(source)
    try:
        response = get_s3_client(aws_credentials).get_object(Bucket=bucket, Key=key)
        size = int(response.get("ContentLength") or 0)
        if size > S3_PARQUET_MAX_BYTES:
            response["Body"].close()
            raise PromptSourceError(
                f"prompt source {source} is {size} bytes, over the limit of "
                f"{S3_PARQUET_MAX_BYTES} for a Parquet file read from S3"
            )
        for chunk in response["Body"].iter_chunks(_CHUNK):
            handle.write(chunk)
    except (BotoCoreError, ClientError) as exc:
        reason = explain_s3_error(exc, bucket=bucket, key=key, action="read the prompt file")
        raise PromptSourceError(f"cannot read prompt source {source}: {reason}") from exc


@contextlib.contextmanager
def _local_copy(source: str, aws_credentials: Any) -> Iterator[Path]:
    """The file to open: the path itself, or a temporary copy of the S3 object (0600)."""
    if not is_s3_uri(source):
        path = Path(source).expanduser()
        if path.is_dir():
            raise PromptSourceError(f"prompt source {source} is a folder, not a file")
        if not path.exists():
            raise PromptSourceError(f"prompt file {source} does not exist")
        yield path
        return
    with tempfile.NamedTemporaryFile(prefix="flux-flows-", suffix=".parquet", delete=False) as f:
        name = f.name
    try:
        with open(name, "wb") as handle:
            _s3_to_file(source, aws_credentials, handle)
        yield Path(name)
    finally:
        os.unlink(name)


def _whole(value: Any, where: str) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            raise PromptSourceError(
                f"{where} is NaN, not a whole number (pandas writes a missing integer as "
                "NaN: leave the cell null, or write the column as Int64)"
            )
        if not value.is_integer():
            raise PromptSourceError(f"{where} is {value}, not a whole number")
        return int(value)
    return value


def _finite(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise PromptSourceError(f"{where} is {value}, not a number")
    return value


def _refuse(kind: str, type_: Any) -> _Check:
    def check(value: Any, where: str) -> Any:
        raise PromptSourceError(
            f"{where} is {value!r}: the column holds {type_}, but this field needs {kind}"
        )

    return check


def _column_check(name: str, type_: Any) -> _Check | None:
    """None when every value of the column can be passed on as read (the fast path)."""
    import pyarrow as pa

    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    if pa.types.is_nested(type_) or pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return _refuse("a single value", type_)
    integer, floating = pa.types.is_integer(type_), pa.types.is_floating(type_)
    if name in _INTEGER:
        return None if integer else _whole if floating else _refuse("whole numbers", type_)
    if name in _NUMBER:
        return None if integer else _finite if floating else _refuse("numbers", type_)
    if name in _BOOLEAN:
        return None if pa.types.is_boolean(type_) else _refuse("true/false", type_)
    if name in _TEXT and not (pa.types.is_string(type_) or pa.types.is_large_string(type_)):
        return _refuse("text", type_)
    return None  # `id`, template fields and kept columns: any single value, as text


def _columns(file: Any, table: TableSpec, source: str) -> tuple[list[str], list[_Check | None]]:
    schema = file.schema_arrow
    table.check_header(list(schema.names), source)
    names = [name for name in table.wanted if name in schema.names]
    free = set(table.template.fields if table.template else ()) | set(table.keep)
    checks = [
        None if name in free and name == "prompt" else _column_check(name, schema.field(name).type)
        for name in names
    ]
    return names, checks


def _rows(file: Any, table: TableSpec, source: str) -> Iterator[PromptRow]:
    names, checks = _columns(file, table, source)
    number = 0
    for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=names, use_threads=False):
        values = [column.to_pylist() for column in batch.columns]
        for cells in zip(*values, strict=True):
            number += 1
            where = f"{source} row {number}"
            row = {}
            for name, check, value in zip(names, checks, cells, strict=True):
                if value is None:
                    continue
                row[name] = value if check is None else check(value, f"{where} column {name!r}")
            yield table.shape(row, where)


def iter_parquet(
    source: str, *, aws_credentials: Any = None, table: TableSpec | None = None
) -> Iterator[PromptRow]:
    """Rows of a `.parquet` file, path or `s3://`, as "<source> row N" (N from 1)."""
    pq = _pyarrow()
    import pyarrow as pa

    with _local_copy(source, aws_credentials) as path:
        try:
            # Streamed column chunks, not whole ones buffered ahead: the memory of a batch.
            file = pq.ParquetFile(path, pre_buffer=False, buffer_size=_CHUNK)
        except (pa.ArrowException, OSError) as exc:
            raise PromptSourceError(f"{source}: not a readable Parquet file ({exc})") from exc
        found = False
        with file:
            for row in _rows(file, table or TableSpec(), source):
                found = True
                yield row
        if not found:
            raise PromptSourceError(f"no prompts in {source}")
