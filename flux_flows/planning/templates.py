"""Prompts made from the tables data teams already have: a template over each row's columns.

A catalogue export has `name`, `colour`, `sku`, not a `prompt`; each team used to write the same
flow to glue them together. A `TableSpec` turns any row (CSV, JSONL, Parquet, in-memory dicts)
into a `PromptRow`: the prompt rendered from the template, the request fields the row sets, and
the columns the user asked to keep, which ride along into the manifest and the S3 metadata so a
downstream job can join the images back to its rows. The rendered prompt alone enters the
request, so the cache key (and what is paid) depends on the words sent, never on the template.

Only plain `{column}` fields are allowed: attribute and index access (`{a.__class__}`,
`{a[0]}`) and format specs would let a template reach into Python objects or build huge strings.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flux_flows.errors import PromptSourceError
from flux_flows.planning.rows import ALLOWED_FIELDS, PromptRow

__all__ = ["PromptTemplate", "TableSpec", "table_spec"]

# Columns a row may carry into a request: everything a prompt file accepts besides the prompt.
_REQUEST_COLUMNS: tuple[str, ...] = tuple(name for name in ALLOWED_FIELDS if name != "prompt")
MAX_TEMPLATE_CHARS = 10_000  # the API's own prompt limit: a longer template can never render


def _blank(value: Any) -> bool:
    """None, NaN (pandas' missing value) and whitespace-only text are "no value"."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def cell_text(value: Any) -> str:
    """A cell as the text a template or a metadata header gets (12 -> "12", True -> "true")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


class PromptTemplate:
    """`"studio photo of a {name} in {colour}"`: Python format fields, column names only."""

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("prompt_template is empty: e.g. 'studio photo of a {name}'")
        if len(text) > MAX_TEMPLATE_CHARS:
            raise ValueError(f"prompt_template is over {MAX_TEMPLATE_CHARS} characters")
        self.text = text
        self.fields: tuple[str, ...] = tuple(dict.fromkeys(self._field_names(text)))
        if not self.fields:
            raise ValueError(
                f"prompt_template {text!r} has no {{column}} field: every row would get the "
                "same prompt"
            )

    @staticmethod
    def _field_names(text: str) -> Iterable[str]:
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:  # "Single '}' encountered", an unclosed '{'
            raise ValueError(
                f"prompt_template {text!r}: {exc} (write a literal brace as {{{{ or }}}})"
            ) from exc
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not name.isidentifier():
                raise ValueError(
                    f"prompt_template field {{{name}}}: only a plain column name is allowed "
                    "(no positional {}, attribute {a.b} or index {a[0]} access)"
                )
            if spec or conversion:
                raise ValueError(
                    f"prompt_template field {{{name}}}: conversions and format specs "
                    "(!r, :>10) are not allowed; format the column in the table instead"
                )
            yield name

    def render(self, row: Mapping[str, Any], defaults: Mapping[str, str], where: str) -> str:
        """The row's prompt; a field the row lacks or leaves empty, without a default, is an
        error naming the row and the field (found by `plan`, before anything is paid for)."""
        values: dict[str, str] = {}
        for name in self.fields:
            value = row.get(name)
            if _blank(value):
                if name not in defaults:
                    says = "has no" if name not in row else "has an empty"
                    raise PromptSourceError(
                        f"{where}: {says} {name!r} for the prompt template (give the column a "
                        f"value, or a default: --template-default {name}=...)"
                    )
                value = defaults[name]
            values[name] = cell_text(value).strip()
        return self.text.format_map(values)

    def __repr__(self) -> str:
        return f"PromptTemplate({self.text!r})"


@dataclass(frozen=True)
class TableSpec:
    """How rows become prompts: a template (or the `prompt` column), defaults, kept columns."""

    template: PromptTemplate | None = None
    defaults: Mapping[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] = ()

    @property
    def wanted(self) -> tuple[str, ...]:
        """The columns a row source needs to read; a Parquet reader reads only these."""
        prompt = self.template.fields if self.template else ("prompt",)
        return tuple(dict.fromkeys((*prompt, *_REQUEST_COLUMNS, *self.keep)))

    def required(self) -> tuple[str, ...]:
        """Columns a table with a header must have: the prompt's sources and the kept ones."""
        prompt = self.template.fields if self.template else ("prompt",)
        return tuple(dict.fromkeys((*(f for f in prompt if f not in self.defaults), *self.keep)))

    def check_header(self, columns: Sequence[str], source: str) -> None:
        """A missing column is a typo found before any row is read."""
        missing = [name for name in self.required() if name not in columns]
        if missing:
            found = ", ".join(c or "<empty>" for c in columns)
            raise PromptSourceError(
                f"{source}: no column {', '.join(map(repr, missing))} (found: {found})"
            )

    def shape(self, row: Mapping[str, Any], where: str) -> PromptRow:
        """One table row as a prompt row; columns nobody asked for are ignored."""
        fields = {k: row[k] for k in _REQUEST_COLUMNS if k in row and not _blank(row[k])}
        if self.template is not None:
            fields["prompt"] = self.template.render(row, self.defaults, where)
        else:
            prompt = row.get("prompt")
            if _blank(prompt):
                raise PromptSourceError(f"{where}: the prompt is empty")
            if not isinstance(prompt, str):
                kind = type(prompt).__name__
                raise PromptSourceError(f"{where}: 'prompt' must be text, got {kind}")
            fields["prompt"] = prompt
        kept = {k: cell_text(row[k]) for k in self.keep if k in row and not _blank(row[k])}
        return PromptRow(fields, where, columns=kept or None)


def _keep_list(keep_columns: Sequence[str] | str | None) -> tuple[str, ...]:
    names = keep_columns.split(",") if isinstance(keep_columns, str) else list(keep_columns or ())
    kept = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
    bad = [name for name in kept if name in ALLOWED_FIELDS]
    if bad:
        raise ValueError(
            f"keep_columns {', '.join(map(repr, bad))}: request fields and 'id' are recorded "
            "already; name other columns"
        )
    return kept


def table_spec(
    prompt_template: str | None = None,
    template_defaults: Mapping[str, str] | None = None,
    keep_columns: Sequence[str] | str | None = None,
) -> TableSpec | None:
    """The spec of a batch's settings, or None when it asks for neither (plain prompt files)."""
    if prompt_template is None and not template_defaults and not keep_columns:
        return None
    template = PromptTemplate(prompt_template) if prompt_template is not None else None
    defaults = {str(k): cell_text(v) for k, v in (template_defaults or {}).items()}
    if defaults and template is None:
        raise ValueError("template_defaults need a prompt_template to fill")
    unused = sorted(set(defaults) - set(template.fields if template else ()))
    if unused:
        raise ValueError(
            f"template_defaults {', '.join(map(repr, unused))}: not a field of the template "
            f"{prompt_template!r}"
        )
    empty = sorted(name for name, value in defaults.items() if not value.strip())
    if empty:
        raise ValueError(f"template_defaults {', '.join(map(repr, empty))}: empty default")
    return TableSpec(template, defaults, _keep_list(keep_columns))
