"""Prompt sources: every format, local and in S3 (moto over HTTP), and every way they go wrong."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from flux_flows.errors import PromptSourceError
from flux_flows.models import ImageRequest
from flux_flows.planning.sources import (
    ALLOWED_FIELDS,
    OVERRIDE_FIELDS,
    PromptRow,
    normalize_prompts,
    read_prompts,
)
from flux_flows.storage.s3 import get_s3_client

Writer = Callable[[str, bytes | str], str]


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    """Writes a prompt file and returns its path as the user would pass it."""

    def _write(name: str, content: bytes | str) -> str:
        path = tmp_path / name
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return str(path)

    return _write


def prompts_of(rows: list[PromptRow]) -> list[str]:
    return [row.fields["prompt"] for row in rows]


def test_override_fields_are_the_request_fields() -> None:
    assert set(OVERRIDE_FIELDS) == {
        "model",
        "aspect_ratio",
        "seed",
        "guidance_scale",
        "num_inference_steps",
        "safety_check",
        "output_format",
        # FLUX Kontext (issue 8): an edit's input image and Kontext's own knobs.
        "input_image",
        "input_image_sha256",
        "safety_tolerance",
        "prompt_upsampling",
    }
    assert set(ALLOWED_FIELDS) == {"prompt", "id", *OVERRIDE_FIELDS}


# --------------------------------------------------------------------------------------------
# .txt
# --------------------------------------------------------------------------------------------


def test_txt_one_prompt_a_line_skipping_blanks_and_comments(write: Writer) -> None:
    path = write("prompts.txt", "# moodboard\na red fox\n\n   \n  a blue whale  \r\n#skip\nthird\n")
    rows = read_prompts(path)
    assert prompts_of(rows) == ["a red fox", "a blue whale", "third"]
    assert [row.where for row in rows] == [f"{path} line 2", f"{path} line 5", f"{path} line 7"]
    assert rows[0].fields == {"prompt": "a red fox"}


def test_txt_accepts_a_bom_and_unicode(write: Writer) -> None:
    rows = read_prompts(write("bom.txt", b"\xef\xbb\xbfCaf\xc3\xa9 \xe6\x9d\xb1\xe4\xba\xac\n"))
    assert prompts_of(rows) == ["Café 東京"]


def test_txt_uppercase_extension(write: Writer) -> None:
    assert prompts_of(read_prompts(write("P.TXT", "x\n"))) == ["x"]


# --------------------------------------------------------------------------------------------
# .csv
# --------------------------------------------------------------------------------------------


def test_csv_with_overrides_and_id(write: Writer) -> None:
    content = (
        " Prompt ,SEED,aspect_ratio,id,model\n"
        '"a mug, on oak",7,16:9,SKU-1,\n'
        "\n"
        "a lamp,,,SKU-2,flux-1-dev-fp8\n"
        '"a poster\nwith two lines",,,,\n'
        "a chair\n"
    )
    path = write("prompts.csv", content)
    rows = read_prompts(path)
    assert [row.fields for row in rows] == [
        {"prompt": "a mug, on oak", "seed": "7", "aspect_ratio": "16:9", "id": "SKU-1"},
        {"prompt": "a lamp", "id": "SKU-2", "model": "flux-1-dev-fp8"},
        {"prompt": "a poster\nwith two lines"},
        {"prompt": "a chair"},
    ]
    assert [row.where for row in rows] == [f"{path} line {n}" for n in (2, 4, 5, 7)]
    ImageRequest(**{k: v for k, v in rows[0].fields.items() if k != "id"})  # strings convert


def test_csv_with_bom_header(write: Writer) -> None:
    rows = read_prompts(write("excel.csv", b"\xef\xbb\xbfprompt,seed\r\nfox,3\r\n"))
    assert rows[0].fields == {"prompt": "fox", "seed": "3"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("prompt,colour\nfox,red\n", "line 1: unknown column 'colour'; allowed: prompt, id, model"),
        ("text,seed\nfox,1\n", "line 1: the header has no 'prompt' column (found: text, seed)"),
        ("prompt,Prompt\na,b\n", "line 1: column 'prompt' appears twice"),
        ("prompt,seed\nfox,1\n,2\n", "line 3: the prompt is empty"),
        ("prompt,seed\nfox,1\n  ,2\n", "line 3: the prompt is empty"),
        ("prompt,seed\nfox,1\nfox,1,extra\n", "line 3: 3 cells but the header has 2 columns"),
        ("prompt,\nfox,\nbad,oops\n", "line 3: value 'oops' is under a column with no name"),
        (
            'prompt\nfox\n"unclosed, swallowing\nthe next\nrows\n',
            "line 3: malformed CSV (unexpected end of data) in the row spanning lines 3-5; "
            "look for an unclosed quote",
        ),
        ('prompt,seed\nfox,1\n"a"b,2\n', "line 3: malformed CSV ("),
    ],
)
def test_csv_errors_name_the_line(write: Writer, content: str, message: str) -> None:
    path = write("bad.csv", content)
    with pytest.raises(PromptSourceError, match=re.escape(f"{path} {message}")):
        read_prompts(path)


def test_csv_with_only_a_header_has_no_prompts(write: Writer) -> None:
    path = write("empty.csv", "prompt,seed\n\n")
    with pytest.raises(PromptSourceError, match=re.escape(f"no prompts in {path}")):
        read_prompts(path)


def test_csv_trailing_empty_column_is_tolerated(write: Writer) -> None:
    rows = read_prompts(write("excel.csv", "prompt,\nfox,\n"))
    assert rows[0].fields == {"prompt": "fox"}


# --------------------------------------------------------------------------------------------
# .jsonl / .ndjson
# --------------------------------------------------------------------------------------------


def test_jsonl_with_overrides_nulls_and_blank_lines(write: Writer) -> None:
    content = (
        '{"prompt": "a fox", "seed": 7, "safety_check": true, "id": 12}\n'
        "\n"
        '{"prompt": "a whale", "model": null, "guidance_scale": 4.5}\n'
    )
    path = write("prompts.jsonl", content)
    rows = read_prompts(path)
    assert [row.fields for row in rows] == [
        {"prompt": "a fox", "seed": 7, "safety_check": True, "id": 12},
        {"prompt": "a whale", "guidance_scale": 4.5},
    ]
    assert [row.where for row in rows] == [f"{path} line 1", f"{path} line 3"]


def test_ndjson_extension(write: Writer) -> None:
    assert prompts_of(read_prompts(write("p.ndjson", '{"prompt": "x"}'))) == ["x"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", ', "not valid JSON"),
        ('["a fox"]', 'expected a JSON object such as {"prompt": "..."}, got an array'),
        ('"a fox"', 'expected a JSON object such as {"prompt": "..."}, got a string'),
        ("null", 'expected a JSON object such as {"prompt": "..."}, got null'),
        ('{"seed": 1}', "no 'prompt'"),
        ('{"prompt": null}', "no 'prompt'"),
        ('{"prompt": 42}', "'prompt' must be a string, got int"),
        ('{"prompt": "  "}', "'prompt' is empty"),
        ('{"prompt": "x", "colour": "red", "Seed": 1}', "unknown field 'Seed', 'colour'; allowed:"),
    ],
)
def test_jsonl_errors_name_the_line(write: Writer, line: str, message: str) -> None:
    path = write("bad.jsonl", f'{{"prompt": "fine"}}\n\n{line}\n')
    with pytest.raises(PromptSourceError, match=re.escape(f"{path} line 3: {message}")):
        read_prompts(path)


# --------------------------------------------------------------------------------------------
# Source-level errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["empty.txt", "empty.csv", "empty.jsonl"])
def test_empty_file_has_no_prompts(write: Writer, name: str) -> None:
    path = write(name, "")
    with pytest.raises(PromptSourceError, match=re.escape(f"no prompts in {path}")):
        read_prompts(path)


def test_only_comments_has_no_prompts(write: Writer) -> None:
    with pytest.raises(PromptSourceError, match="no prompts in"):
        read_prompts(write("c.txt", "# nothing yet\n\n"))


def test_not_utf8_names_the_line_of_the_first_bad_byte(write: Writer) -> None:
    path = write("latin1.txt", b"first\nsecond\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(
        PromptSourceError, match=re.escape(f"{path} line 3: byte 0xe9 is not UTF-8")
    ):
        read_prompts(path)


@pytest.mark.parametrize("name", ["utf16.txt", "utf16.csv", "utf16.jsonl"])
def test_utf16_without_bom_is_refused(write: Writer, name: str) -> None:
    path = write(name, "prompt\nfox\n".encode("utf-16-le"))
    with pytest.raises(PromptSourceError, match=re.escape(f"{path} line 1: contains a NUL")):
        read_prompts(path)


def test_utf16_with_bom_is_not_utf8(write: Writer) -> None:
    path = write("bom16.txt", "fox\n".encode("utf-16"))
    with pytest.raises(
        PromptSourceError, match=re.escape(f"{path} line 1: byte 0xff is not UTF-8")
    ):
        read_prompts(path)


def test_unknown_extension_lists_the_supported_ones(write: Writer) -> None:
    path = write("prompts.xlsx", "x")
    with pytest.raises(
        PromptSourceError, match=r"'\.xlsx'; supported: \.txt, \.csv, \.jsonl, \.ndjson"
    ):
        read_prompts(path)
    with pytest.raises(PromptSourceError, match="no extension"):
        read_prompts(write("prompts", "x"))


def test_missing_local_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.txt")
    with pytest.raises(PromptSourceError, match=re.escape(f"prompt file {path} does not exist")):
        read_prompts(path)


def test_folder_is_not_a_prompt_file(tmp_path: Path) -> None:
    folder = tmp_path / "dir.txt"
    folder.mkdir()
    with pytest.raises(PromptSourceError, match="is a folder"):
        read_prompts(str(folder))


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.txt").write_text("fox\n")
    assert prompts_of(read_prompts("~/p.txt")) == ["fox"]


# --------------------------------------------------------------------------------------------
# s3:// sources
# --------------------------------------------------------------------------------------------


def upload(bucket: str, key: str, body: bytes | str) -> str:
    data = body.encode() if isinstance(body, str) else body
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


@pytest.mark.parametrize(
    ("key", "body"),
    [
        ("in/prompts.txt", "a fox\n# c\na whale\n"),
        ("in/prompts.csv", "prompt,seed\na fox,1\na whale,\n"),
        ("in/prompts.jsonl", '{"prompt": "a fox", "seed": 1}\n{"prompt": "a whale"}\n'),
        ("in/prompts.ndjson", '{"prompt": "a fox"}\n{"prompt": "a whale"}\n'),
    ],
)
def test_s3_sources_in_every_format(s3_bucket: str, key: str, body: str) -> None:
    source = upload(s3_bucket, key, body)
    rows = read_prompts(source)
    assert prompts_of(rows) == ["a fox", "a whale"]
    assert rows[0].where.startswith(f"{source} line ")


def test_s3_errors_name_the_line(s3_bucket: str) -> None:
    source = upload(s3_bucket, "bad.jsonl", '{"prompt": "ok"}\n{"prompt": "x", "size": 3}\n')
    with pytest.raises(
        PromptSourceError, match=re.escape(f"{source} line 2: unknown field 'size'")
    ):
        read_prompts(source)


def test_s3_not_utf8(s3_bucket: str) -> None:
    source = upload(s3_bucket, "bad.txt", b"ok\n\xff\xfe\n")
    with pytest.raises(PromptSourceError, match=re.escape(f"{source} line 2: byte 0xff")):
        read_prompts(source)


def test_s3_empty_object(s3_bucket: str) -> None:
    source = upload(s3_bucket, "empty.csv", b"")
    with pytest.raises(PromptSourceError, match=re.escape(f"no prompts in {source}")):
        read_prompts(source)


def test_s3_missing_object(s3_bucket: str) -> None:
    source = f"s3://{s3_bucket}/nope.txt"
    with pytest.raises(PromptSourceError, match=re.escape(f"{source}: no object at {source}")):
        read_prompts(source)


def test_s3_missing_bucket(s3_server: str) -> None:
    with pytest.raises(PromptSourceError, match="bucket 'no-such-prompt-bucket' does not exist"):
        read_prompts("s3://no-such-prompt-bucket/prompts.txt")


def test_s3_access_denied(s3_server: str) -> None:
    client = get_s3_client()
    with Stubber(client) as stub:
        stub.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
        with pytest.raises(PromptSourceError, match="access denied to bucket 'locked'") as info:
            read_prompts("s3://locked/prompts.txt")
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize(
    "source", ["s3://bucket-only.txt", "s3://bucket/folder.txt/", "s3:///x.txt"]
)
def test_s3_source_must_name_an_object(source: str) -> None:
    with pytest.raises(PromptSourceError, match="must name an object"):
        read_prompts(source)


def test_s3_unknown_extension_is_refused_before_any_request(s3_server: str) -> None:
    # Any real call would fail: the stub has no responses queued.
    with (
        Stubber(get_s3_client()),
        pytest.raises(PromptSourceError, match=r"unsupported prompt file type '\.xlsx'"),
    ):
        read_prompts("s3://b/prompts.xlsx")


def test_s3_source_with_credentials_block(s3_bucket: str, s3_server: str) -> None:
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    source = upload(s3_bucket, "p.txt", "fox\n")
    block = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_server),
    )
    assert prompts_of(read_prompts(source, aws_credentials=block)) == ["fox"]


# --------------------------------------------------------------------------------------------
# normalize_prompts
# --------------------------------------------------------------------------------------------


def test_normalize_strings_dicts_and_models() -> None:
    request = ImageRequest(prompt="a lamp", model="flux-1-dev-fp8", seed=9)
    rows = normalize_prompts(
        ["a fox", {"prompt": "a whale", "seed": 3, "id": "w", "model": None}, request]
    )
    assert rows[0] == PromptRow({"prompt": "a fox"}, "prompts[0]")
    assert rows[1] == PromptRow({"prompt": "a whale", "seed": 3, "id": "w"}, "prompts[1]")
    assert rows[2].where == "prompts[2]"
    assert rows[2].fields == request.model_dump()
    assert ImageRequest(**rows[2].fields) == request


def test_normalize_accepts_tuples_and_empty_lists() -> None:
    assert prompts_of(normalize_prompts(("a", "b"))) == ["a", "b"]
    assert normalize_prompts([]) == []


@pytest.mark.parametrize("bad", ["a single prompt", b"bytes", {"prompt": "x"}, 42, None])
def test_normalize_refuses_a_non_list(bad: object) -> None:
    with pytest.raises(TypeError, match="prompts must be a list"):
        normalize_prompts(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        ({"prompt": "x", "colour": "red"}, ValueError, "prompts[1]: unknown field 'colour'"),
        ({"seed": 3}, ValueError, "prompts[1]: no 'prompt'"),
        ({"prompt": 3}, ValueError, "prompts[1]: 'prompt' must be a string, got int"),
        ("   ", ValueError, "prompts[1]: the prompt is empty"),
        (3.5, TypeError, "prompts[1]: expected a prompt string, a dict with 'prompt'"),
    ],
)
def test_normalize_errors_name_the_index(
    item: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        normalize_prompts(["fine", item])  # type: ignore[list-item]


# Read as a stream (issue 15): the same rows and line numbers from a file and from S3
# --------------------------------------------------------------------------------------------

MIXED_CSV = (
    b"\xef\xbb\xbfprompt,id\r\n"
    b'"a fox\r\nin two lines",a\r\n'  # a quoted cell spans lines 2-3
    b"a whale,b\r"  # an old-Mac line end
    b"a heron,c\n"
    b'"caf\xc3\xa9",d'  # no final line end
)


def test_a_stream_keeps_line_ends_inside_quoted_csv_cells_and_counts_lines(
    write: Writer, s3_bucket: str
) -> None:
    for source in (write("mixed.csv", MIXED_CSV), upload(s3_bucket, "mixed.csv", MIXED_CSV)):
        rows = read_prompts(source)
        assert prompts_of(rows) == ["a fox\r\nin two lines", "a whale", "a heron", "café"]
        assert [row.where for row in rows] == [f"{source} line {n}" for n in (2, 4, 5, 6)], source


def test_a_bad_byte_after_lone_carriage_returns_names_its_line(
    write: Writer, s3_bucket: str
) -> None:
    body = b"one\rtwo\rthree \xff\n"
    for source in (write("cr.txt", body), upload(s3_bucket, "cr.txt", body)):
        with pytest.raises(PromptSourceError, match=re.escape(f"{source} line 3: byte 0xff")):
            read_prompts(source)


def test_iter_prompts_yields_rows_before_it_reaches_a_bad_line(write: Writer) -> None:
    """A batch plans row by row and holds no row it has planned; a problem further down still
    stops the whole batch before any spend (the flow validates every row before its first
    request)."""
    from flux_flows.planning.sources import iter_prompts

    path = write("late.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\nnot json\n')
    rows = iter_prompts(path)
    assert [next(rows).fields["prompt"], next(rows).fields["prompt"]] == ["a", "b"]
    with pytest.raises(PromptSourceError, match=re.escape(f"{path} line 3: not valid JSON")):
        next(rows)
    with pytest.raises(PromptSourceError, match="unsupported prompt file type"):
        iter_prompts(write("x.docx", "a"))  # checked on the call, before anything is read
