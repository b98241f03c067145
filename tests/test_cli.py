"""The `flux-flows` command as a user runs it: a subprocess, exit codes, readable errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from helpers.common import TEST_API_KEY, cli, summary_row


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stdout + done.stderr


def test_generate_writes_an_image(tmp_path: Path, cli_env: dict[str, str]) -> None:
    target = tmp_path / "fox.png"
    done = cli(
        "generate",
        "a red fox",
        "-o",
        str(target),
        "--aspect-ratio",
        "16:9",
        "--seed",
        "7",
        env=cli_env,
    )
    assert done.returncode == 0, done.stderr
    with Image.open(target) as image:
        assert (image.format, image.size) == ("PNG", (1344, 768))
    assert "seed=7" in done.stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--aspect-ratio", "7:3"], 2, "aspect_ratio"),
        (["--steps", "99"], 2, "num_inference_steps"),
        (["--model", "sdxl"], 2, "model"),
        (["--seed", "0"], 2, "seed"),
        (["--guidance", "0"], 2, "guidance_scale"),
    ],
)
def test_generate_bad_input_names_the_field(
    tmp_path: Path, cli_env: dict[str, str], args: list[str], code: int, words: str
) -> None:
    done = cli("generate", "a fox", "-o", str(tmp_path / "x.jpg"), *args, env=cli_env)
    assert done.returncode == code
    assert words in done.stderr
    no_traceback(done)
    assert not (tmp_path / "x.jpg").exists()


def test_generate_bad_output_name(tmp_path: Path, cli_env: dict[str, str]) -> None:
    done = cli("generate", "a fox", "-o", str(tmp_path / "x.gif"), env=cli_env)
    assert done.returncode == 2 and ".jpg" in done.stderr
    done = cli("generate", "a fox", "-o", str(tmp_path / "missing" / "x.jpg"), env=cli_env)
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_generate_credentials_errors(tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k != "FIREWORKS_API_KEY"}
    done = cli("generate", "a fox", "-o", str(tmp_path / "x.jpg"), env=env)
    assert done.returncode == 3 and "FIREWORKS_API_KEY" in done.stderr
    wrong = "fw-wrong-key-000000000000"
    done = cli(
        "generate",
        "a fox",
        "-o",
        str(tmp_path / "x.jpg"),
        env={**cli_env, "FIREWORKS_API_KEY": wrong},
    )
    assert done.returncode == 3 and "API key" in done.stderr
    assert wrong not in done.stderr + done.stdout
    no_traceback(done)


def test_run_with_a_refused_key_exits_3_like_generate(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    wrong = "fw-wrong-key-111111111111"
    done = cli(
        "run",
        "--prompt",
        "a fox",
        "--prompt",
        "a cat",
        "--to",
        str(tmp_path / "out"),
        env={**cli_env, "FIREWORKS_API_KEY": wrong},
    )
    assert done.returncode == 3, done.stderr
    assert "refused the credentials" in done.stderr
    assert wrong not in done.stderr + done.stdout
    no_traceback(done)
    assert flow_env.stats.generations == 0


def test_generate_filtered_writes_nothing(tmp_path: Path, cli_env: dict[str, str]) -> None:
    target = tmp_path / "x.jpg"
    done = cli("generate", "nsfw thing", "-o", str(target), "--safety-check", env=cli_env)
    assert done.returncode == 5 and "content-filtered" in done.stderr
    assert not target.exists()


def test_run_then_plan_then_rerun(tmp_path: Path, cli_env: dict[str, str], flow_env: Any) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red fox\n\na blue whale\na green parrot\n")
    out = tmp_path / "out"
    done = cli("run", str(prompts), "--to", str(out), "--variants", "2", env=cli_env)
    assert done.returncode == 0, done.stderr
    no_traceback(done)
    assert "API calls" in done.stdout and "estimated cost" in done.stdout
    assert len(list((out / "images").iterdir())) == 6
    assert flow_env.stats.generations == 6
    planned = cli("plan", str(prompts), "--to", str(out), "--variants", "3", env=cli_env)
    assert planned.returncode == 0, planned.stderr
    assert summary_row(planned.stdout, "already stored") == "6"
    assert summary_row(planned.stdout, "to generate") == "3"
    assert summary_row(planned.stdout, "estimated cost") == "$0.0042"
    assert flow_env.stats.generations == 6  # planning spends nothing
    again = cli("run", str(prompts), "--to", str(out), "--variants", "2", env=cli_env)
    assert again.returncode == 0
    assert summary_row(again.stdout, "API calls") == "0"
    assert flow_env.stats.generations == 6


def test_run_with_failures_exits_1_and_replay_finishes_them(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "fine fox"}, {"prompt": "flaky whale [[flaky:5]]", "id": "w-1"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    done = cli("run", str(prompts), "--to", str(out), env=cli_env)
    assert done.returncode == 1
    assert "failed" in done.stderr
    manifest = out / "manifest.jsonl"
    failed = [json.loads(x) for x in manifest.read_text().splitlines()][1]
    assert failed["finish_reason"] == "ERROR"
    before = flow_env.stats.requests
    replayed = cli("replay", str(manifest), env=cli_env)
    assert replayed.returncode == 0, replayed.stderr
    assert flow_env.stats.requests == before + 1  # only the failed image, once
    # The destination's manifest still lists both images, the replayed one in its place.
    latest = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [r["index"] for r in latest] == [0, 1]
    assert latest[1]["finish_reason"] == "SUCCESS" and latest[1]["seed"] == failed["seed"]
    assert latest[1]["item_id"] == "w-1" and Path(latest[1]["uri"]).exists()


def test_run_missing_file_is_a_clear_error(tmp_path: Path, cli_env: dict[str, str]) -> None:
    done = cli("run", str(tmp_path / "nope.txt"), "--to", str(tmp_path), env=cli_env)
    assert done.returncode == 2 and "does not exist" in done.stderr
    no_traceback(done)


def test_demo_runs_offline_and_reruns_for_free(tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if not k.startswith("FIREWORKS_")}
    done = cli("demo", "--to", str(tmp_path / "demo"), env=env)
    assert done.returncode == 0, done.stderr
    no_traceback(done)
    assert len(list((tmp_path / "demo" / "images").iterdir())) == 15
    assert len(list((tmp_path / "demo" / "filtered").iterdir())) == 1
    assert "Manifest:" in done.stdout
    assert "generating 16 images" in done.stderr
    again = cli("demo", "--to", str(tmp_path / "demo"), env=env)
    assert summary_row(again.stdout, "API calls") == "0"
    # Issue 22 item 7: the second demo says what really happens, and shows no empty 0/0 bar.
    assert "16 images already stored: nothing to generate" in again.stderr
    assert "generating 16" not in again.stderr and "0/0" not in again.stderr
    assert TEST_API_KEY not in done.stdout + done.stderr


def test_plan_an_edit_batch_with_inline_prompts(tmp_path: Path, cli_env: dict[str, str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a.png", "red"), ("b.jpg", "blue"), ("c.png", "green")):
        Image.new("RGB", (64, 48), colour).save(photos / name)
    args = ["--prompt", "make it winter", "--prompt", "make it night", "--edit", str(photos)]
    done = cli(
        "plan", *args, "--model", "flux-kontext-pro", "--to", str(tmp_path / "out"), env=cli_env
    )
    assert done.returncode == 0, done.stderr
    assert summary_row(done.stdout, "images requested") == "6"
    assert summary_row(done.stdout, "to generate") == "6"
    assert summary_row(done.stdout, "estimated cost") == "$0.2400"  # Kontext pro: $0.04 an image
    wrong = cli("plan", *args, "--to", str(tmp_path / "out"), env=cli_env)
    assert wrong.returncode == 2 and "Kontext" in wrong.stderr
    both = cli("plan", str(tmp_path / "p.txt"), "--prompt", "x", env=cli_env)
    assert both.returncode == 2 and "exactly one" in both.stderr


def test_ctrl_c_stops_submitting_finishes_in_flight_and_writes_the_manifest(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    """Issue 16: one Ctrl-C never loses a paid image or the record of what was not done."""
    import signal
    import time

    flow_env.configure(latency_s=0.5)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "flux_flows.cli", "run", "--to", str(out), "-c", "2"]
    for i in range(30):
        argv += ["-p", f"an interrupted crane {i}"]
    process = subprocess.Popen(
        argv, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "images").is_dir() or len(list((out / "images").iterdir())) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 30  # every requested image has its line
    stored = [r for r in records if r["finish_reason"] == "SUCCESS"]
    skipped = [r for r in records if "interrupted" in (r["error"] or "")]
    assert stored and skipped and len(stored) + len(skipped) == 30
    # Everything generated was stored and recorded: nothing paid for is lost.
    assert flow_env.stats.generations == len(stored) == len(list((out / "images").iterdir()))


def test_overlapping_runs_into_one_destination_pay_once(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    """A second run started while the first is generating waits for its images: the test
    proves they overlapped (a run said it was waiting), or it fails."""
    import time

    flow_env.configure(latency_s=1.0)  # the first run takes ~10 s: the second starts inside it
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"an overlapping egret {i}\n" for i in range(40)))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "flux_flows.cli", "run", str(prompts), "--to", str(out)]
    first = subprocess.Popen([*argv, "-c", "4"], env=cli_env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "claims").is_dir() or not list((out / "claims").iterdir()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = cli("run", str(prompts), "--to", str(out), "-c", "4", env=cli_env)
    _, first_err = first.communicate(timeout=180)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    # They overlapped: at least one met the other's live leases and waited.
    assert "waiting for" in second.stderr + first_err, (second.stderr[-1500:], first_err[-1500:])
    assert flow_env.stats.generations == 40  # distinct images, each paid once
    assert len(list((out / "images").iterdir())) == 40
    runs = sorted((out / "runs").glob("*/manifest.jsonl"))
    assert len(runs) == 2
    for manifest in runs:
        records = [json.loads(x) for x in manifest.read_text().splitlines()]
        assert len(records) == 40 and all(r["finish_reason"] == "SUCCESS" for r in records)
    assert not list((out / "claims").iterdir())  # both claims released


def test_emulator_default_port_is_clear_of_dask_and_the_same_everywhere() -> None:
    """8787 is Dask's dashboard; the command, `serve` and the constant agree on one port."""
    import inspect

    from flux_flows.cli import tools
    from flux_flows.emulator import DEFAULT_PORT, serve

    command_default = inspect.signature(tools.emulator).parameters["port"].default
    assert command_default == inspect.signature(serve).parameters["port"].default == DEFAULT_PORT
    assert DEFAULT_PORT not in {4200, 5000, 8000, 8080, 8786, 8787, 8888}


def test_a_manifest_that_cannot_be_stored_is_said_kept_and_exits_1(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    """The images are stored but the destination's manifest.jsonl cannot be (here a folder sits
    at its name): the CLI says "not recorded", names the kept copy and exits 1, never 0."""
    out = tmp_path / "out"
    (out / "manifest.jsonl").mkdir(parents=True)
    done = cli(
        "run",
        "-p",
        "an unrecorded ibis",
        "-p",
        "an unrecorded stork",
        "--to",
        str(out),
        env=cli_env,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "not recorded" in done.stderr and "Traceback" not in done.stderr
    assert len(list((out / "images").iterdir())) == 2 == flow_env.stats.generations
    kept = [w for w in done.stderr.split() if w.endswith(".jsonl") and "manifest-" in w]
    assert kept and Path(kept[0].rstrip(".,;)")).is_file(), done.stderr[-2000:]


def test_a_second_ctrl_c_aborts_at_once(
    tmp_path: Path, cli_env: dict[str, str], flow_env: Any
) -> None:
    """The README's promise: the first Ctrl-C lets what is in flight finish; a second aborts at
    once, without waiting for the in-flight answers (here 60 s away)."""
    import signal
    import time

    flow_env.configure(latency_s=60.0)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "flux_flows.cli", "run", "--to", str(out), "-c", "2"]
    argv += ["-p", "an aborted heron 1", "-p", "an aborted heron 2", "-p", "an aborted heron 3"]
    process = subprocess.Popen(argv, env=cli_env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    claims = out / "claims"
    while not claims.is_dir() or len([p for p in claims.iterdir() if p.suffix == ".lease"]) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # let the first Ctrl-C be handled as the first
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 30, "the second Ctrl-C waited for the in-flight answers"
    assert process.returncode == 130, stderr[-2000:]
    assert "aborted: the images in flight are abandoned" in stderr
    assert flow_env.stats.generations == 0  # nothing was billed: the requests were abandoned
