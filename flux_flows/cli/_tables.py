"""`--template`, `--template-default` and `--keep-columns` for `run` and `plan`.

They become the settings `prompt_template`, `template_defaults` and `keep_columns`
(`planning.templates`), checked here so a bad template fails before a Prefect server starts.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from flux_flows.cli._common import fail_with
from flux_flows.planning.templates import TableSpec, table_spec

TemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--template",
        metavar="TEXT",
        help="Make each row's prompt from its columns, e.g. 'studio photo of a {name} in "
        "{colour}' (CSV, JSONL or Parquet; plain {column} fields only).",
    ),
]
TemplateDefaultOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--template-default",
        metavar="COLUMN=VALUE",
        help="A template field's value for rows that leave it empty (repeatable).",
    ),
]
KeepColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--keep-columns",
        metavar="A,B",
        help="Columns carried into the manifest and the S3 metadata, e.g. sku,category.",
    ),
]


def template_defaults_of(pairs: list[str] | None) -> dict[str, str] | None:
    """`colour=white` pairs as a dict; a pair without `=` is a typo, refused."""
    if not pairs:
        return None
    defaults: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            fail_with(ValueError(f"--template-default {pair!r}: write COLUMN=VALUE"))
        defaults[name.strip()] = value
    return defaults


def keep_columns_of(text: str | None) -> list[str] | None:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None


def checked_table(
    template: str | None, defaults: dict[str, str] | None, keep: list[str] | None
) -> TableSpec | None:
    try:
        return table_spec(template, defaults, keep)
    except ValueError as exc:
        fail_with(exc)


def table_options(options: dict[str, Any]) -> dict[str, Any]:
    """A command's options with these three as settings: checked now, before any Prefect
    server starts, so a bad template is a usage error, not a failed run."""
    converted = {
        **options,
        "template_defaults": template_defaults_of(options.get("template_defaults")),
        "keep_columns": keep_columns_of(options.get("keep_columns")),
    }
    checked_table(
        converted.get("prompt_template"),
        converted["template_defaults"],
        converted["keep_columns"],
    )
    return converted
