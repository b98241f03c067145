"""Prompts from tables (issue 24): Parquet sources, prompt templates, kept columns.

Real parts throughout: files on disk, a moto S3 server over HTTP, the emulator over HTTP with
its call counter, and `flux-flows plan` as a subprocess.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux_flows.errors import PromptSourceError
from flux_flows.flows import generate_images, generate_images_from_file
from flux_flows.planning.sources import read_prompts
from flux_flows.planning.templates import table_spec
from flux_flows.storage.metadata import ROW_FIELDS_MAX, row_metadata, s3_metadata
from helpers.common import cli, summary_row

TEMPLATE = "studio photo of a {name} in {colour}, white background"
CATALOGUE = [
    {"id": "p-1", "name": "mug", "colour": "red", "sku": "SKU-1", "category": "kitchen"},
    {"id": "p-2", "name": "lamp", "colour": "", "sku": "SKU-2", "category": "living"},
    {"id": "p-3", "name": "chair", "colour": "oak", "sku": "SKU-3", "category": "living"},
]
RENDERED = [
    "studio photo of a mug in red, white background",
    "studio photo of a lamp in white, white background",
    "studio photo of a chair in oak, white background",
]


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    """The same rows as CSV, JSONL or Parquet (an empty string is a null in Parquet)."""
    names = list(rows[0])
    if path.suffix == ".csv":
        lines = [",".join(names)] + [",".join(str(r[n]) for n in names) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        columns = {n: [None if r[n] == "" else r[n] for r in rows] for n in names}
        pq.write_table(pa.table(columns), path)
    return path


def spec() -> Any:
    return table_spec(TEMPLATE, {"colour": "white"}, "sku,category")


# --------------------------------------------------------------------------------------------
# Templates over every row source
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_template_renders_each_row_and_keeps_columns(tmp_path: Path, suffix: str) -> None:
    rows = read_prompts(write_table(CATALOGUE, tmp_path / f"c{suffix}"), table=spec())
    assert [r.fields["prompt"] for r in rows] == RENDERED
    assert [r.fields["id"] for r in rows] == ["p-1", "p-2", "p-3"]
    assert rows[0].columns == {"sku": "SKU-1", "category": "kitchen"}
    assert all("name" not in r.fields and "sku" not in r.fields for r in rows)


def test_template_over_a_text_file_uses_its_prompt(tmp_path: Path) -> None:
    source = tmp_path / "p.txt"
    source.write_text("a fox\n# comment\na whale\n")
    rows = read_prompts(source, table=table_spec("watercolour of {prompt}"))
    assert [r.fields["prompt"] for r in rows] == ["watercolour of a fox", "watercolour of a whale"]


@pytest.mark.parametrize(
    ("suffix", "where"), [(".csv", "line 3"), (".jsonl", "line 2"), (".parquet", "row 2")]
)
def test_empty_field_without_default_names_row_and_field(
    tmp_path: Path, suffix: str, where: str
) -> None:
    source = write_table(CATALOGUE, tmp_path / f"c{suffix}")
    with pytest.raises(PromptSourceError, match=rf"{where}: has (an empty|no) 'colour'"):
        read_prompts(source, table=table_spec(TEMPLATE))


def test_jsonl_row_missing_a_field_names_it(tmp_path: Path) -> None:
    source = tmp_path / "c.jsonl"
    source.write_text('{"name": "mug", "colour": "red"}\n{"colour": "blue"}\n')
    with pytest.raises(PromptSourceError, match=r"c.jsonl line 2: has no 'name'"):
        read_prompts(source, table=table_spec(TEMPLATE))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_column_missing_from_the_header_is_found_first(tmp_path: Path, suffix: str) -> None:
    source = write_table(CATALOGUE, tmp_path / f"c{suffix}")
    with pytest.raises(PromptSourceError, match=r"no column 'size' \(found: id, name, colour"):
        read_prompts(source, table=table_spec("a {size} {name}"))
    with pytest.raises(PromptSourceError, match=r"no column 'barcode'"):
        read_prompts(source, table=table_spec(TEMPLATE, keep_columns="barcode"))


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{name.__class__}", "only a plain column name"),
        ("{name[0]}", "only a plain column name"),
        ("{} in {0}", "only a plain column name"),
        ("{name!r}", "format specs"),
        ("{name:>100000000}", "format specs"),
        ("{name", "expected '}'"),
        ("no fields at all", "has no {column} field"),
        ("", "prompt_template is empty"),
    ],
)
def test_abusable_templates_are_refused(template: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        table_spec(template)


def test_defaults_and_kept_columns_are_checked() -> None:
    with pytest.raises(ValueError, match="'size': not a field of the template"):
        table_spec(TEMPLATE, {"size": "L"})
    with pytest.raises(ValueError, match="need a prompt_template"):
        table_spec(None, {"colour": "white"})
    with pytest.raises(ValueError, match=r"'seed'.*recorded already"):
        table_spec(TEMPLATE, keep_columns=["seed"])


# --------------------------------------------------------------------------------------------
# Parquet: columns, types, S3, the optional extra
# --------------------------------------------------------------------------------------------


def test_parquet_plain_prompt_column_with_overrides(tmp_path: Path) -> None:
    source = tmp_path / "p.parquet"
    table = {
        "prompt": ["a fox", "a whale"],
        "seed": [5.0, None],  # pandas' float column of whole numbers, one missing
        "aspect_ratio": ["16:9", None],
        "num_inference_steps": pa.array([4, 2], pa.int8()),
        "unused": [[1, 2], [3]],  # a column nobody asked for is not even read
    }
    pq.write_table(pa.table(table), source, row_group_size=1)
    fox, whale = read_prompts(source)
    assert fox.fields == {
        "prompt": "a fox",
        "seed": 5,
        "aspect_ratio": "16:9",
        "num_inference_steps": 4,
    }
    assert type(fox.fields["seed"]) is int and fox.where.endswith("p.parquet row 1")
    assert whale.fields == {"prompt": "a whale", "num_inference_steps": 2}


@pytest.mark.parametrize(
    ("column", "values", "says"),
    [
        ("seed", [5.0, math.nan], r"row 2 column 'seed' is NaN, not a whole number"),
        ("seed", [5.0, 2.5], r"row 2 column 'seed' is 2.5, not a whole number"),
        ("num_inference_steps", [None, "4"], r"row 2 column 'num_inference_steps' is '4'.*whole"),
        ("guidance_scale", [math.inf, 3.0], r"row 1 column 'guidance_scale' is inf"),
        ("safety_check", ["yes", None], r"row 1 column 'safety_check'.*true/false"),
        ("aspect_ratio", [None, 16], r"row 2 column 'aspect_ratio'.*needs text"),
    ],
)
def test_parquet_column_types_are_checked(
    tmp_path: Path, column: str, values: list[Any], says: str
) -> None:
    source = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], column: values}), source)
    with pytest.raises(PromptSourceError, match=says):
        read_prompts(source)


def test_parquet_without_pyarrow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_table(CATALOGUE, tmp_path / "c.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(
        PromptSourceError, match=r"needs pyarrow: pip install 'flux-flows\[parquet\]'"
    ):
        read_prompts(source, table=spec())


def test_not_a_parquet_file_and_missing_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("prompt\na fox\n")
    with pytest.raises(PromptSourceError, match=r"bogus\.parquet: not a readable Parquet file"):
        read_prompts(bogus)
    with pytest.raises(PromptSourceError, match="does not exist"):
        read_prompts(tmp_path / "absent.parquet")


def test_parquet_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    source = write_table(CATALOGUE, tmp_path / "c.parquet")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="in/catalogue.parquet", Body=source.read_bytes())
    temp = Path(__import__("tempfile").gettempdir())
    before = set(temp.glob("flux-flows-*.parquet"))
    rows = read_prompts(f"s3://{s3_bucket}/in/catalogue.parquet", table=spec())
    assert [r.fields["prompt"] for r in rows] == RENDERED
    assert rows[2].where == f"s3://{s3_bucket}/in/catalogue.parquet row 3"
    assert set(temp.glob("flux-flows-*.parquet")) == before  # the download is removed
    with pytest.raises(PromptSourceError, match="cannot read prompt source"):
        read_prompts(f"s3://{s3_bucket}/in/absent.parquet")


# --------------------------------------------------------------------------------------------
# S3 metadata of kept columns
# --------------------------------------------------------------------------------------------


def test_row_metadata_is_ascii_capped_and_never_collides() -> None:
    columns = {"sku": "SKU-1", "SKU": "other", "名前": "x", "note": "café ☕"}
    columns.update({f"c{i}": "v" * 300 for i in range(10)})
    row = dict(row_metadata("p-1", columns))
    assert row["row-id"] == "p-1" and row["row-sku"] == "SKU-1"
    assert "row-note" in row and len([k for k in row if k == "row-sku"]) == 1
    metadata = s3_metadata({**row, "prompt": "a mug " * 400})
    assert all(v.isascii() for v in metadata.values())
    assert metadata["row-note"] == "caf%C3%A9 %E2%98%95"
    row_bytes = sum(
        len(k) + len("x-amz-meta-") + len(v) for k, v in metadata.items() if k.startswith("row-")
    )
    assert row_bytes <= ROW_FIELDS_MAX and metadata["prompt"].startswith("a mug")


# --------------------------------------------------------------------------------------------
# Flows: manifest, S3 metadata, nothing spent on bad input, the cache
# --------------------------------------------------------------------------------------------


def test_flow_records_template_prompt_and_columns_in_s3(
    s3_bucket: str, tmp_path: Path, flow_env: Any
) -> None:
    source = write_table(CATALOGUE, tmp_path / "c.parquet")
    report = generate_images_from_file(
        str(source),
        f"s3://{s3_bucket}/cat/",
        prompt_template=TEMPLATE,
        template_defaults={"colour": "white"},
        keep_columns=["sku", "category"],
    )
    assert report.api_calls == 3 and flow_env.stats.requests == 3
    s3 = boto3.client("s3")
    body = s3.get_object(Bucket=s3_bucket, Key="cat/manifest.jsonl")["Body"].read()
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert [line["prompt"] for line in lines] == RENDERED
    assert {line["prompt_template"] for line in lines} == {TEMPLATE}
    assert lines[1]["columns"] == {"sku": "SKU-2", "category": "living"}
    assert lines[1]["item_id"] == "p-2"
    key = lines[1]["uri"].removeprefix(f"s3://{s3_bucket}/")
    metadata = s3.head_object(Bucket=s3_bucket, Key=key)["Metadata"]
    assert (metadata["row-id"], metadata["row-sku"], metadata["row-category"]) == (
        "p-2",
        "SKU-2",
        "living",
    )


def test_changed_template_pays_only_for_changed_prompts(tmp_path: Path, flow_env: Any) -> None:
    rows = [
        {"name": "mug", "shot": "studio photo"},
        {"name": "lamp", "shot": "studio photo"},
        {"name": "chair", "shot": "close-up"},
    ]
    source = write_table(rows, tmp_path / "c.csv")
    first = generate_images_from_file(
        str(source), str(tmp_path / "out"), prompt_template="studio photo of a {name}"
    )
    second = generate_images_from_file(
        str(source), str(tmp_path / "out"), prompt_template="{shot} of a {name}"
    )
    assert first.api_calls == 3
    assert second.api_calls == 1 and second.cache_hits == 2
    assert flow_env.stats.requests == 4


def test_in_memory_rows_take_a_template(tmp_path: Path, flow_env: Any) -> None:
    report = generate_images(
        [{"name": "mug", "sku": "A"}, {"name": "lamp", "sku": "B"}],
        str(tmp_path),
        prompt_template="a {name}",
        keep_columns=["sku"],
    )
    assert [r.prompt for r in report.records] == ["a mug", "a lamp"]
    assert [r.columns for r in report.records] == [{"sku": "A"}, {"sku": "B"}]


@pytest.mark.parametrize(
    ("rows", "kwargs", "says"),
    [
        (CATALOGUE, {"prompt_template": TEMPLATE}, "row 2: has no 'colour'"),
        (CATALOGUE, {"prompt_template": "{name.__class__}"}, "only a plain column name"),
        ([{"prompt": "a", "seed": math.nan}], {}, "row 1 column 'seed' is NaN"),
    ],
)
def test_bad_tables_cost_no_api_call(
    tmp_path: Path, flow_env: Any, rows: list[dict[str, Any]], kwargs: dict[str, Any], says: str
) -> None:
    source = write_table(rows, tmp_path / "c.parquet")
    with pytest.raises((PromptSourceError, ValueError), match=re.escape(says)):
        generate_images_from_file(str(source), str(tmp_path / "out"), **kwargs)
    assert flow_env.stats.requests == 0


def test_cli_plan_finds_a_template_error_before_spending(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    source = write_table(CATALOGUE, tmp_path / "catalogue.parquet")
    plan = ("plan", str(source), "--to", str(tmp_path / "out"), "--template", TEMPLATE)
    bad = cli(*plan, env=cli_env)
    assert bad.returncode == 2, bad.stderr
    assert "catalogue.parquet row 2: has no 'colour'" in bad.stderr
    good = cli(*plan, "--template-default", "colour=white", "--keep-columns", "sku", env=cli_env)
    assert good.returncode == 0, good.stderr
    assert summary_row(good.stdout, "to generate") == "3"
    assert flow_env.stats.requests == 0


def test_catalogue_example_runs_offline_as_users_run_it(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    """`python flows/catalogue.py` with no Fireworks settings: its own emulator, local output."""
    example = Path(__file__).resolve().parents[1] / "flows" / "catalogue.py"
    env = {k: v for k, v in cli_env.items() if not k.startswith("FIREWORKS_")}
    out = tmp_path / "out"

    def run() -> str:
        done = subprocess.run(
            [sys.executable, str(example), "--destination", str(out)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    first = run()
    assert "3 images, 3 API calls" in first
    assert "using a local Fireworks emulator" in first
    shots = [json.loads(line[line.index("{") :]) for line in first.splitlines() if '"sku"' in line]
    assert [shot["sku"] for shot in shots] == ["MUG-RED", "LAMP-01", "CHR-OAK"]
    assert (
        shots[1]["prompt"] == "studio photo of a desk lamp in white, white background, soft shadow"
    )
    assert all(Path(shot["uri"]).is_file() for shot in shots)
    assert "3 images, 0 API calls" in run()  # the second run pays for nothing
    assert flow_env.stats.requests == 0  # the example's own emulator answered, not this one
