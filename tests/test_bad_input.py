"""Bad input of every kind is refused with a message naming the problem, before any spend.

Every case runs through the public entry points (the flows, `ImageRequest`) against the emulator
and a moto S3 server, and checks that the emulator saw no request at all: a mistake in a prompt
file must cost nothing. The one exception is a wrong API key, which only the API can detect: it
must stop the batch after at most `max_concurrency` requests, with no generation billed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydantic import ValidationError

from flux_flows import FireworksCredentials, ImageRequest
from flux_flows.errors import MissingCredentialsError, PromptSourceError, StorageError
from flux_flows.flows import generate_images, generate_images_from_file
from flux_flows.models import describe_validation_error

pytestmark = pytest.mark.usefixtures("flow_env")  # heartbeats off: the `prefect_api` fixture


def refused(
    emulator: Any, call: Callable[[], Any], error: type[BaseException], *fragments: str
) -> str:
    """`call` raises `error` whose message contains every fragment (regex), and nothing was sent."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in: {message}"
    assert emulator.stats.requests == 0, "a request was sent for input that was already wrong"
    return message


# --------------------------------------------------------------------------------------------
# ImageRequest: every field out of range names the field
# --------------------------------------------------------------------------------------------

BAD_FIELDS: list[tuple[dict[str, Any], str, str]] = [
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": "   \t\n"}, "prompt", "at least 1 character"),
    ({"prompt": "x" * 10_001}, "prompt", "at most 10000 characters"),
    ({"prompt": "a\x00b"}, "prompt", "NUL"),
    ({"prompt": 42}, "prompt", "valid string"),
    ({"model": "flux-1-pro"}, "model", "flux-1-schnell-fp8"),
    ({"aspect_ratio": "7:3"}, "aspect_ratio", "16:9"),
    ({"aspect_ratio": "1024x1024"}, "aspect_ratio", "1:1"),
    ({"guidance_scale": 0}, "guidance_scale", "greater than 0"),
    ({"guidance_scale": -2.5}, "guidance_scale", "greater than 0"),
    ({"guidance_scale": 20.01}, "guidance_scale", "less than or equal to 20"),
    ({"guidance_scale": float("nan")}, "guidance_scale", ""),
    ({"guidance_scale": float("inf")}, "guidance_scale", "less than or equal to 20"),
    ({"guidance_scale": "high"}, "guidance_scale", "valid number"),
    ({"num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
    ({"num_inference_steps": 13}, "num_inference_steps", "at most 12 steps"),
    (
        {"model": "flux-1-dev-fp8", "num_inference_steps": 51},
        "num_inference_steps",
        "less than or equal to 50",
    ),
    ({"num_inference_steps": 2.5}, "num_inference_steps", "fractional"),
    ({"seed": 0}, "seed", "random seed"),
    ({"seed": -1}, "seed", "greater than or equal to 1"),
    ({"seed": 2**32}, "seed", "less than or equal to 4294967295"),
    ({"seed": "abc"}, "seed", "valid integer"),
    ({"safety_check": "maybe"}, "safety_check", "valid boolean"),
    ({"output_format": "webp"}, "output_format", "'jpeg' or 'png'"),
    ({"width": 512}, "width", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(
    ("fields", "name", "says"), BAD_FIELDS, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_FIELDS)]
)
def test_image_request_field_out_of_range_names_the_field(
    fields: dict[str, Any], name: str, says: str
) -> None:
    with pytest.raises(ValidationError) as info:
        ImageRequest(**{"prompt": "a fox", **fields})
    message = describe_validation_error(info.value)
    assert message.startswith(f"{name}: "), message
    assert says in message


@pytest.mark.parametrize("name", ["seed", "num_inference_steps", "guidance_scale"])
def test_booleans_are_not_numbers(name: str) -> None:
    with pytest.raises(ValidationError, match=name):
        ImageRequest(prompt="a fox", **{name: True})


def test_every_bad_row_is_reported_at_once_before_any_spend(flow_env: Any, tmp_path: Path) -> None:
    # Unknown keys are refused earlier, by name (test_bad_prompt_lists); the rest are values.
    # Over 20 bad rows: the message lists 20 and counts the rest.
    cases = [c for c in BAD_FIELDS if "prompt" not in c[0] and c[1] != "width"]
    cases += cases[:3]
    prompts: list[Any] = ["a good prompt"] + [{"prompt": "bad", **fields} for fields, _, _ in cases]
    message = refused(
        flow_env,
        lambda: generate_images(prompts, str(tmp_path)),
        ValueError,
        r"invalid prompt\(s\), nothing was generated",
    )
    # Rows over the listing cap are summarised; each listed one names its row and field.
    assert message.startswith(f"{len(cases)} invalid prompt(s)")
    for index, (fields, name, _) in enumerate(cases[:20], start=1):
        assert re.search(rf"prompts\[{index}\]: {name}: ", message), (index, fields)
    assert f"... and {len(cases) - 20} more" in message
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused batch"


@pytest.mark.parametrize(
    ("prompts", "error", "says"),
    [
        ([], ValueError, "prompt list is empty"),
        (["fine", "   "], ValueError, r"prompts\[1\]: the prompt is empty"),
        ([{"prompt": "  "}], ValueError, r"prompts\[0\]: 'prompt' is empty"),
        ([{"seed": 3}], ValueError, r"prompts\[0\]: no 'prompt'"),
        ([{"prompt": "x", "width": 5}], ValueError, r"prompts\[0\]: unknown field 'width'"),
        ([{"prompt": ["a", "b"]}], ValueError, r"'prompt' must be a string"),
    ],
    ids=["empty-list", "blank-string", "blank-dict", "no-prompt", "unknown-key", "list-prompt"],
)
def test_bad_prompt_lists(
    flow_env: Any, tmp_path: Path, prompts: list[Any], error: type[Exception], says: str
) -> None:
    refused(flow_env, lambda: generate_images(prompts, str(tmp_path)), error, says)


def test_a_bare_string_is_not_a_prompt_list(flow_env: Any, tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"prompts: Input should be a valid list"):
        generate_images("a red fox", str(tmp_path))  # type: ignore[arg-type]
    assert flow_env.stats.requests == 0


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"model": "flux-1-pro"}, r"model: Input should be 'flux-1-schnell-fp8'"),
        ({"aspect_ratio": "7:3"}, r"prompts\[0\]: aspect_ratio"),
        ({"guidance_scale": 0}, r"prompts\[0\]: guidance_scale"),
        ({"num_inference_steps": 13}, r"num_inference_steps: flux-1-schnell-fp8 takes at most 12"),
        ({"output_format": "gif"}, r"output_format"),
        ({"variants": 0}, r"variants must be at least 1"),
        ({"max_concurrency": 0}, r"max_concurrency must be at least 1"),
        ({"requests_per_minute": 0}, r"requests_per_minute must be positive"),
        ({"budget_usd": -1}, r"budget_usd must not be negative"),
    ],
    ids=[
        "model",
        "aspect_ratio",
        "guidance_scale",
        "num_inference_steps",
        "output_format",
        "variants",
        "max_concurrency",
        "requests_per_minute",
        "budget_usd",
    ],
)
def test_bad_flow_options(
    flow_env: Any, tmp_path: Path, options: dict[str, Any], says: str
) -> None:
    refused(
        flow_env, lambda: generate_images(["a fox"], str(tmp_path), **options), ValueError, says
    )


# --------------------------------------------------------------------------------------------
# Prompt files: local and s3://, with the line named
# --------------------------------------------------------------------------------------------

BAD_FILES: list[tuple[str, bytes, type[Exception], list[str]]] = [
    ("empty.txt", b"", PromptSourceError, [r"no prompts in .*empty\.txt"]),
    ("comments.txt", b"# only a comment\n\n   \n", PromptSourceError, ["no prompts in"]),
    ("header-only.csv", b"prompt,seed\n", PromptSourceError, ["no prompts in"]),
    ("empty.jsonl", b"\n\n", PromptSourceError, ["no prompts in"]),
    (
        "latin1.txt",
        b"a fox\nun caf\xe9 au lait\n",
        PromptSourceError,
        [r"line 2", r"0xe9 is not UTF-8"],
    ),
    (
        "utf16.txt",
        "a fox\n".encode("utf-16"),
        PromptSourceError,
        [r"line 1", r"(not UTF-8|UTF-16)"],
    ),
    (
        "unclosed.csv",
        b'prompt,seed\n"a fox,1\nmore,2\n',
        PromptSourceError,
        [r"line 2", r"malformed CSV|unclosed quote"],
    ),
    (
        "cells.csv",
        b"prompt,seed\na fox,1\na cat,2,extra\n",
        PromptSourceError,
        [r"line 3", r"3 cells but the header has 2 columns"],
    ),
    (
        "noprompt.csv",
        b"text,seed\na fox,1\n",
        PromptSourceError,
        [r"line 1", r"no 'prompt' column"],
    ),
    ("unknown.csv", b"prompt,colour\na fox,red\n", PromptSourceError, [r"line 1", "'colour'"]),
    ("badvalue.csv", b"prompt,seed\na fox,1\na cat,abc\n", ValueError, [r"line 3", r"seed"]),
    (
        "badjson.jsonl",
        b'{"prompt": "a fox"}\n{"prompt": "a cat"}\n{"prompt": "an owl",,}\n',
        PromptSourceError,
        [r"line 3", r"not valid JSON"],
    ),
    (
        "array.jsonl",
        b'{"prompt": "a fox"}\n["a cat"]\n',
        PromptSourceError,
        [r"line 2", r"expected a JSON object"],
    ),
    (
        "unknown.jsonl",
        b'{"prompt": "a fox", "colour": "red"}\n',
        PromptSourceError,
        [r"line 1", r"unknown field 'colour'"],
    ),
    (
        "nonstring.jsonl",
        b'{"prompt": "a fox"}\n{"prompt": 7}\n',
        PromptSourceError,
        [r"line 2", r"'prompt' must be a string"],
    ),
    (
        "badvalue.jsonl",
        b'{"prompt": "a fox"}\n\n{"prompt": "a cat", "aspect_ratio": "7:3"}\n',
        ValueError,
        [r"line 3", r"aspect_ratio"],
    ),
    ("prompts.yaml", b"- a fox\n", PromptSourceError, [r"unsupported prompt file type '\.yaml'"]),
]


@pytest.mark.parametrize(
    ("name", "content", "error", "says"), BAD_FILES, ids=[case[0] for case in BAD_FILES]
)
def test_bad_prompt_files(
    flow_env: Any,
    tmp_path: Path,
    name: str,
    content: bytes,
    error: type[Exception],
    says: list[str],
) -> None:
    source = tmp_path / name
    source.write_bytes(content)
    refused(
        flow_env,
        lambda: generate_images_from_file(str(source), str(tmp_path / "out")),
        error,
        re.escape(str(source)),
        *says,
    )


def test_missing_and_unreadable_local_sources(flow_env: Any, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope.txt")
    refused(
        flow_env,
        lambda: generate_images_from_file(missing, out),
        PromptSourceError,
        "does not exist",
    )
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    refused(
        flow_env,
        lambda: generate_images_from_file(str(folder), out),
        PromptSourceError,
        "is a folder",
    )


def test_unreadable_s3_sources(flow_env: Any, s3_bucket: str, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    refused(
        flow_env,
        lambda: generate_images_from_file("s3://no-such-bucket-anywhere/prompts.txt", out),
        PromptSourceError,
        r"bucket 'no-such-bucket-anywhere' does not exist",
    )
    refused(
        flow_env,
        lambda: generate_images_from_file(f"s3://{s3_bucket}/missing/prompts.jsonl", out),
        PromptSourceError,
        rf"no object at s3://{s3_bucket}/missing/prompts\.jsonl",
    )
    refused(
        flow_env,
        lambda: generate_images_from_file("s3:///prompts.txt", out),
        PromptSourceError,
        r"must name an object, s3://BUCKET/KEY",
    )
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key="in/bad.jsonl", Body=b'{"prompt": "ok"}\n{"prompt": \n'
    )
    refused(
        flow_env,
        lambda: generate_images_from_file(f"s3://{s3_bucket}/in/bad.jsonl", out),
        PromptSourceError,
        rf"s3://{s3_bucket}/in/bad\.jsonl line 2",
    )


# --------------------------------------------------------------------------------------------
# Destinations and credentials
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("destination", "error", "says"),
    [
        (
            "s3://no-such-destination-bucket/x/",
            StorageError,
            "'no-such-destination-bucket' does not exist",
        ),
        ("s3://", ValueError, "no bucket name"),
        ("s3://bad bucket/x", ValueError, "not a valid bucket name"),
        ("gs://bucket/x", ValueError, r"unsupported scheme 'gs://'"),
        ("   ", ValueError, "destination is empty"),
    ],
    ids=["missing-bucket", "no-bucket", "bad-bucket-name", "gs-scheme", "blank"],
)
def test_bad_destinations(
    flow_env: Any, s3_server: str, destination: str, error: type[Exception], says: str
) -> None:
    refused(flow_env, lambda: generate_images(["a fox"], destination), error, says)


def test_unwritable_local_destination(flow_env: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    refused(
        flow_env,
        lambda: generate_images(["a fox"], str(blocker / "out")),
        StorageError,
        "is not writable",
    )


def test_missing_api_key_fails_before_any_request(
    flow_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FIREWORKS_API_KEY")
    refused(
        flow_env,
        lambda: generate_images(["a fox"], str(tmp_path)),
        MissingCredentialsError,
        "FIREWORKS_API_KEY",
    )


def test_bad_base_url_fails_before_any_request(
    flow_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIREWORKS_BASE_URL", "api.fireworks.ai/inference/v1")
    refused(
        flow_env,
        lambda: generate_images(["a fox"], str(tmp_path)),
        ValueError,
        "must start with http",
    )


@pytest.mark.parametrize("via", ["env", "block"])
def test_wrong_api_key_stops_the_batch(
    flow_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    wrong = "fw-wrong-key-0000000000000000"
    kwargs: dict[str, Any] = {}
    if via == "env":
        monkeypatch.setenv("FIREWORKS_API_KEY", wrong)
    else:
        kwargs["credentials"] = FireworksCredentials(api_key=wrong, base_url=flow_env.base_url)
    prompts = [f"wrong key {i}" for i in range(12)]
    report = generate_images(prompts, str(tmp_path), max_concurrency=3, **kwargs)
    assert report.counts["ERROR"] == 12 and report.counts["SUCCESS"] == 0
    assert flow_env.stats.generations == 0
    assert 1 <= flow_env.stats.requests <= 3  # at most one window, then nothing more is sent
    assert flow_env.stats.by_status == {401: flow_env.stats.requests}
    refused_by_api = [r for r in report.records if r.api_calls]
    assert all("rejected the API key" in (r.error or "") for r in refused_by_api)
    assert all("FIREWORKS_API_KEY" in (r.error or "") for r in refused_by_api)
    skipped = [r for r in report.records if not r.api_calls]
    assert len(skipped) == 12 - flow_env.stats.requests
    assert all("not attempted" in (r.error or "") for r in skipped)
    assert report.api_calls == flow_env.stats.requests
