"""The moments of doubt a newcomer met (issue 22, item 7): each answer now says what happened."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from test_cli import cli, no_traceback

from flux_flows import build_request, generate_image, upload_image
from flux_flows.flows import generate_images, replay_failed
from flux_flows.models import FinishReason
from flux_flows.results import BatchReport, ImageRecord

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_short_version_flag() -> None:
    from flux_flows import __version__

    for flag in ("-V", "--version"):
        done = cli(flag, env=dict(os.environ))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"flux-flows {__version__}"


@pytest.mark.parametrize("argv", [["run", "--help"], ["plan", "--help"], ["--help"]])
def test_help_at_80_columns_cuts_nothing(argv: list[str]) -> None:
    done = cli(*argv, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert not re.search(r"\w(…|\.\.\.)", done.stdout), done.stdout  # a word cut short
    if argv != ["--help"]:
        assert "[default: flux-1-schnell-fp8]" in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 80


def test_cli_says_export_the_key_and_python_keeps_its_message(
    tmp_path: Path, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux_flows.client import resolve_api_key
    from flux_flows.errors import MissingCredentialsError

    env = {k: v for k, v in cli_env.items() if k != "FIREWORKS_API_KEY"}
    for argv in (
        ["generate", "a fox", "-o", str(tmp_path / "x.jpg")],
        ["run", "-p", "a keyless fox", "--to", str(tmp_path / "out")],
    ):
        done = cli(*argv, env=env)
        assert done.returncode == 3, done.stderr
        assert "export FIREWORKS_API_KEY=" in done.stderr
        assert "api_key=" not in done.stderr
        no_traceback(done)
    monkeypatch.delenv("FIREWORKS_API_KEY")
    with pytest.raises(MissingCredentialsError, match=r"pass api_key=\.\.\."):
        resolve_api_key(None)


def test_run_and_replay_take_a_base_url(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    """`--base-url` wins over FIREWORKS_BASE_URL, as for `generate`; a failed run names `replay`,
    which prints its contact sheet."""
    dead = "http://127.0.0.1:9/inference/v1"  # nothing listens on the discard port
    env = {**cli_env, "FIREWORKS_BASE_URL": dead}
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "base fox"}, {"prompt": "base whale [[flaky:5]]"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    done = cli("run", str(prompts), "--to", str(out), "--base-url", flow_env.base_url, env=env)
    assert done.returncode == 1, done.stderr
    named = re.search(r"`flux-flows replay (\S+manifest\.jsonl)`", done.stderr)
    assert named, done.stderr
    assert flow_env.stats.generations == 1  # the fox, from the emulator named by --base-url
    replayed = cli("replay", named.group(1), "--base-url", flow_env.base_url, env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert "Contact sheet:" in replayed.stdout
    assert (out / "contact-sheet.html").exists()
    assert flow_env.stats.generations == 2
    bad = cli("run", "-p", "x", "--to", str(out), "--base-url", "ftp://nope", env=cli_env)
    assert bad.returncode == 2 and "http://" in bad.stderr
    no_traceback(bad)


def test_replay_with_nothing_to_replay(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    first = generate_images(["a complete fox"], str(tmp_path))
    assert first.failed == 0 and first.manifest_uri
    report = replay_failed(first.manifest_uri)
    assert report.requested == 0 and report.api_calls == 0
    assert report.manifest_uri == first.manifest_uri  # the manifest it read: every image is there
    done = cli("replay", first.manifest_uri, env=cli_env)
    assert done.returncode == 0, done.stderr
    assert "nothing to replay: the manifest has no ERROR records" in done.stdout
    assert "API calls" not in done.stdout  # no all-zero table
    assert flow_env.stats.generations == 1


def test_every_counts_key_is_documented(tmp_path: Path, flow_env: Any) -> None:
    report = generate_images(["a counted fox"], str(tmp_path))
    assert report.counts["PLANNED"] == 0  # kept: every finish reason is a key, 0 when none
    for key in report.counts:
        assert key in (BatchReport.__doc__ or "") and key in README, key
    assert "PLANNED" in (BatchReport.model_fields["counts"].description or "")


def test_contact_sheet_shows_the_run_wall_time(tmp_path: Path, flow_env: Any) -> None:
    report = generate_images(["a timed fox", "a timed owl"], str(tmp_path))
    sheet = (tmp_path / "contact-sheet.html").read_text()
    shown = re.search(r"<b>wall time:</b> ([0-9.]+) s", sheet)
    assert shown, sheet[:2000]
    assert 0.0 < float(shown.group(1)) <= report.wall_time_s + 0.05


def test_readme_task_flow_run_twice_says_cached(tmp_path: Path, flow_env: Any) -> None:
    """README's `my_flow`: the second run's record is Cached, made no call and cost nothing."""

    @flow
    def my_flow() -> ImageRecord:
        request = build_request("a lighthouse at dusk, newcomer", aspect_ratio="16:9", seed=7)
        image = generate_image(request)
        return upload_image(image, str(tmp_path))

    first, second = my_flow(), my_flow()
    assert flow_env.stats.generations == 1
    assert first.finish_reason is FinishReason.SUCCESS and not first.cached
    assert first.api_calls == 1 and first.estimated_cost_usd == pytest.approx(0.0014)
    assert second.cached and second.api_calls == 0 and second.estimated_cost_usd == 0.0
    assert second.uri == first.uri
