"""The CLI's exit codes and questions where a run goes wrong before it starts.

These run the real command in a subprocess, with PREFECT_API_URL pointing at a port nobody
answers: each case here must end before a flow would start (or, with --yes, fail to start
with exit 4, proving no question held it up).
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from flux_flows.cli import batch
from flux_flows.models import FinishReason
from flux_flows.results import BatchReport, ImageRecord

REPO = Path(__file__).resolve().parent.parent
DEAD_PREFECT = "http://127.0.0.1:9/api"


def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FIREWORKS_"))}
    return {
        **base,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")])),
        "PREFECT_API_URL": DEAD_PREFECT,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "FIREWORKS_API_KEY": "unused",
        "FIREWORKS_BASE_URL": "http://127.0.0.1:9/inference/v1",
        "COLUMNS": "200",
    }


def cli(
    tmp_path: Path, *args: str, tty_answer: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `flux-flows ARGS`; with `tty_answer`, stdin is a terminal that types it."""
    command = [sys.executable, "-m", "flux_flows.cli", *args]
    if tty_answer is None:
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env(tmp_path),
            timeout=120,
        )
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            command,
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(tmp_path),
        )
        os.close(slave)
        os.write(master, tty_answer)
        out, err = process.communicate(timeout=120)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# A destination that is a file is bad input (2), not an API or network failure (4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_destination_that_is_a_file_is_bad_input(tmp_path: Path, command: str) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("not a folder")
    for to, words in (
        (str(afile), "is a file, not a folder"),
        (str(afile / "images"), f"lies under {afile}, which is a file"),
        (f"file://{afile}", "is a file, not a folder"),
    ):
        done = cli(tmp_path, command, "--prompt", "a fox", "--to", to)
        assert done.returncode == 2, done.stderr
        assert words in one_line_error(done)
    assert afile.read_text() == "not a folder"


# --------------------------------------------------------------------------------------------
# Settings no user means: one line, exit 2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--variants", "0"], "variants must be at least 1"),
        (["--budget", "nan"], "budget_usd must be a finite number"),
        (["--budget", "-1"], "budget_usd must not be negative"),
        (["--rpm", "nan"], "requests_per_minute must be a finite number"),
        (["--rpm", "inf"], "requests_per_minute must be a finite number"),
        (["--concurrency", "0"], "max_concurrency must be at least 1"),
    ],
)
def test_settings_no_user_means_are_one_line_errors(
    tmp_path: Path, args: list[str], words: str
) -> None:
    done = cli(tmp_path, "run", "--prompt", "a fox", "--to", str(tmp_path / "o"), *args)
    assert done.returncode == 2
    assert words in one_line_error(done)


@pytest.mark.parametrize("value", ["true", "1e3", "2.5"])
def test_variants_must_be_a_whole_number(tmp_path: Path, value: str) -> None:
    done = cli(tmp_path, "plan", "--prompt", "a fox", "--variants", value)
    assert done.returncode == 2
    assert "--variants" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# A big batch on a terminal asks first
# --------------------------------------------------------------------------------------------


def test_a_huge_batch_on_a_terminal_shows_its_cost_and_asks(tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ("run", "--prompt", "a fox", "--to", str(out), "--variants", "100000")
    declined = cli(tmp_path, *args, tty_answer=b"n\n")
    assert declined.returncode == 1
    assert "$140.0000" in declined.stdout  # the plan, printed before the question
    assert "Generate 100000 image(s) for about $140.00? [y/N]" in declined.stdout
    assert "aborted: nothing was generated" in declined.stderr
    assert not out.exists()
    ended = cli(tmp_path, *args, tty_answer=b"\x04")  # Ctrl-D: no answer is no
    assert ended.returncode == 1 and not out.exists()
    # --yes (or no terminal) goes straight to the run: here, to the dead Prefect API (exit 4).
    for done in (cli(tmp_path, *args, "--yes", tty_answer=b"n\n"), cli(tmp_path, *args)):
        assert done.returncode == 4, done.stderr
        assert "Generate" not in done.stdout
        assert "Failed to reach API" in done.stderr and "Traceback" not in done.stderr


def test_small_batches_are_not_planned_twice_nor_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    monkeypatch.setattr(typer, "confirm", lambda text, **_: asked.append(text) or True)
    settings = batch.BatchSettings(variants=50)
    batch.confirm_large_batch(None, ["a fox"], settings, str(tmp_path / "o"))
    settings = batch.BatchSettings(variants=1000)  # planned: 1000 images, $1.40: not asked
    batch.confirm_large_batch(None, ["a fox"], settings, str(tmp_path / "o"))
    assert asked == []
    settings = batch.BatchSettings(variants=1001)
    batch.confirm_large_batch(None, ["a fox"], settings, str(tmp_path / "o"))
    settings = batch.BatchSettings(variants=400, model="flux-1-dev-fp8")  # 400 x $0.014 > $5
    batch.confirm_large_batch(None, ["a fox"], settings, str(tmp_path / "o"))
    assert asked == [
        "Generate 1001 image(s) for about $1.40?",
        "Generate 400 image(s) for about $5.60?",
    ]


# --------------------------------------------------------------------------------------------
# What a finished run prints and how it exits
# --------------------------------------------------------------------------------------------


def report(*records: ImageRecord, **fields: object) -> BatchReport:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.finish_reason] = counts.get(record.finish_reason, 0) + 1
    base: dict[str, object] = {
        "records": list(records),
        "counts": counts,
        "api_calls": len(records),
        "cache_hits": 0,
        "manifest_uri": None,
        "destination": "/tmp/x",
    }
    return BatchReport.model_validate({**base, **fields})


def record(index: int, reason: FinishReason, error: str | None = None) -> ImageRecord:
    return ImageRecord.model_construct(
        index=index, prompt="p", seed=1, finish_reason=reason, error=error
    )


def test_a_batch_stopped_by_refused_credentials_exits_3(
    capsys: pytest.CaptureFixture[str],
) -> None:
    refused = "AuthenticationError: The API key you provided is invalid. (HTTP 401)"
    stopped = report(
        record(0, FinishReason.ERROR, refused),
        record(1, FinishReason.ERROR, f"not attempted: an earlier request failed with {refused}"),
    )
    with pytest.raises(typer.Exit) as exited:
        batch.finish(stopped)
    assert exited.value.exit_code == 3
    assert "refused the credentials" in capsys.readouterr().err
    with pytest.raises(typer.Exit) as exited:
        batch.finish(report(record(0, FinishReason.ERROR, "ServerError: 503")))
    assert exited.value.exit_code == 1
    batch.finish(report(record(0, FinishReason.SUCCESS)))  # no exit: 0


def test_the_printed_gallery_command_is_shell_quoted(capsys: pytest.CaptureFixture[str]) -> None:
    manifest = "s3://bucket/runs/$(touch pwned) it's/manifest.jsonl"
    batch.print_contact_sheet(
        report(manifest_uri=manifest, contact_sheet_uri="s3://bucket/runs/x/index.html")
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if "flux-flows gallery" in x)
    command = line.split("view it locally: ", 1)[1]
    assert (
        command == "flux-flows gallery 's3://bucket/runs/$(touch pwned) it'\"'\"'s/manifest.jsonl'"
    )
    import shlex

    assert shlex.split(command) == ["flux-flows", "gallery", manifest]
