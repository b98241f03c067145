"""Staging by size, not count (issue 28, item 3): whatever makes a flow run's parameters too big
for Prefect (prompts, input images, all of them together) travels as a file, and a dry run
stages into a temporary folder, never into its destination."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client

from flux_flows import FinishReason, generate_images
from flux_flows.inputs.images import list_input_images
from flux_flows.planning.staging import (
    PREFECT_PARAMETERS_CAP,
    STAGE_ABOVE_BYTES,
    parameters_size,
    staged_arguments,
)

LONG = 9_900  # characters a prompt, under the API's 10,000


def long_prompts(count: int = 99, tag: str = "") -> list[str]:
    """`count` prompts of LONG characters each: 99 of them are ~980 KB of JSON."""
    return [(f"a lighthouse {tag}{i} " + "with waves " * LONG)[:LONG] for i in range(count)]


def flow_run_parameters(state: Any) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        return dict(client.read_flow_run(state.state_details.flow_run_id).parameters)


def png_data_uri(kilobytes: int) -> str:
    """A real PNG of noise (incompressible) whose data URI is about `kilobytes` KB."""
    from PIL import Image

    side = int((kilobytes * 1024 * 3 / 4 / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- the rule, without Prefect ----------------------------------------------------------------


def _flow_like(
    prompts: list[Any],
    destination: str = ".",
    *,
    dry_run: bool = False,
    input_images: list[str] | str | None = None,
    prices: dict[str, float] | None = None,
    staged_prompts: str | None = None,
) -> None:
    """The parameters `staged_arguments` looks at, as `generate_images` has them."""


def test_small_parameters_are_left_as_they_are(tmp_path: Path) -> None:
    args, kwargs = (["a fox"] * 150, str(tmp_path)), {"input_images": ["/a.png"]}
    with staged_arguments(_flow_like, args, kwargs) as (new_args, new_kwargs):
        assert new_args is args and new_kwargs is kwargs  # not even copied
    assert list(tmp_path.iterdir()) == []


def test_few_but_long_prompts_are_staged(tmp_path: Path) -> None:
    """99 prompts are 'few' by count, ~980 KB by size: the size decides."""
    prompts = long_prompts()
    assert parameters_size({"prompts": prompts}) > 900 * 1024
    with staged_arguments(_flow_like, (prompts, str(tmp_path)), {}) as (args, kwargs):
        staged = Path(kwargs["staged_prompts"])
        assert args == ([], str(tmp_path))
        assert staged.parent.parent == tmp_path / "runs" and staged.name == "prompts.jsonl"
        rows = [json.loads(line) for line in staged.read_text().splitlines()]
        assert [row["prompt"] for row in rows] == prompts
    assert staged.exists()  # a real run's staged file is kept beside its run's records


def test_the_sum_of_the_parameters_decides(tmp_path: Path) -> None:
    """Prompts and images each under the threshold, together over it: the bigger one goes."""
    prompts = [f"a fox {i} " + "x" * 1_000 for i in range(150)]  # ~150 KB
    images = [f"/photos/{i:05d}-" + "y" * 100 + ".png" for i in range(1_100)]  # ~130 KB
    for value in (prompts, images):
        assert parameters_size({"p": value}) < STAGE_ABOVE_BYTES
    kwargs = {"input_images": images}
    with staged_arguments(_flow_like, (prompts, str(tmp_path)), kwargs) as (args, staged):
        assert staged["staged_prompts"].endswith("/prompts.jsonl")
        assert staged["input_images"] == images  # enough room once the prompts left
        assert args[0] == []
        assert parameters_size({"destination": args[1], **staged}) < STAGE_ABOVE_BYTES


def test_a_long_input_image_list_is_staged_and_read_back(tmp_path: Path) -> None:
    data_uri = png_data_uri(626)
    images = [data_uri, "relative/photo.png", "s3://bucket/a.png"]
    kwargs = {"input_images": images}
    with staged_arguments(_flow_like, (["make it winter"], str(tmp_path)), kwargs) as (_, staged):
        listed_at = staged["input_images"]
        assert listed_at.endswith("/input_images.jsonl") and listed_at.startswith(str(tmp_path))
        assert "staged_prompts" not in staged  # one small prompt: left as it was
        assert list_input_images(listed_at) == [
            data_uri,
            str(Path("relative/photo.png").absolute()),
            "s3://bucket/a.png",
        ]


def test_what_cannot_be_staged_is_refused_with_its_name(tmp_path: Path) -> None:
    prices = {f"model-{i}-" + "z" * 200: 0.01 for i in range(PREFECT_PARAMETERS_CAP // 200)}
    call = ([f"a fox {i}" for i in range(50_000)], str(tmp_path))
    with (
        pytest.raises(ValueError, match=r"over Prefect's cap of 512 KB.*'prices'"),
        staged_arguments(_flow_like, call, {"prices": prices}),
    ):
        pass
    assert list(tmp_path.iterdir()) == []  # nothing staged for a call that cannot run


def test_a_dry_run_stages_in_a_temporary_folder_it_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    destination = tmp_path / "destination"
    call = (long_prompts(), str(destination))
    with staged_arguments(_flow_like, call, {"dry_run": True}) as (_, kwargs):
        staged = Path(kwargs["staged_prompts"])
        assert staged.is_relative_to(temp) and len(staged.read_text().splitlines()) == 99
        assert (staged.parents[1].stat().st_mode & 0o777) == 0o700  # mkdtemp's own folder
    assert not destination.exists()
    assert list(temp.iterdir()) == []  # removed when the call returned


# --- through the flow ------------------------------------------------------------------------


def test_99_long_prompts_run(tmp_path: Path, flow_env: Any) -> None:
    """Issue 28: 99 prompts of 9,900 characters (~980 KB) got Prefect's 422."""
    prompts = long_prompts(tag="run ")
    state = generate_images(prompts, str(tmp_path), max_concurrency=8, return_state=True)
    report = state.result()
    assert report.counts[FinishReason.SUCCESS] == 99 and flow_env.stats.requests == 99
    parameters = flow_run_parameters(state)
    assert parameters["prompts"] == []
    assert Path(parameters["staged_prompts"]).parent.parent == tmp_path / "runs"
    assert len(json.dumps(parameters)) < 10_000
    manifest = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in manifest] == prompts


def test_a_kontext_edit_with_a_big_data_uri_runs(tmp_path: Path, flow_env: Any) -> None:
    """Issue 28: one edit of a 626 KB data URI got Prefect's 422."""
    data_uri = png_data_uri(626)
    state = generate_images(
        ["make it winter"],
        str(tmp_path),
        model="flux-kontext-pro",
        input_images=[data_uri],
        return_state=True,
    )
    report = state.result()
    assert report.counts[FinishReason.SUCCESS] == 1
    parameters = flow_run_parameters(state)
    assert parameters["input_images"].endswith("/input_images.jsonl")
    assert parameters["prompts"] == ["make it winter"]


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """A folder nobody can write in, root included (root ignores mode bits: chattr +i then)."""
    if os.getuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], check=False).returncode:
        pytest.skip("running as root without chattr +i: cannot make a read-only folder")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_a_dry_run_into_a_read_only_destination_writes_nothing_there(
    tmp_path: Path, flow_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    destination = tmp_path / "read-only"
    destination.mkdir()
    (destination / "existing.txt").write_text("left alone")
    prompts = long_prompts(tag="dry ")
    with read_only(destination):
        with pytest.raises(OSError):
            (destination / "probe").write_text("x")  # it really is read-only
        state = generate_images(prompts, str(destination), dry_run=True, return_state=True)
        report = state.result()
    assert report.counts[FinishReason.PLANNED] == 99 and flow_env.stats.requests == 0
    assert sorted(p.name for p in destination.iterdir()) == ["existing.txt"]
    staged = flow_run_parameters(state)["staged_prompts"]
    assert staged.startswith(str(temp)) and not Path(staged).exists()
    assert list(temp.iterdir()) == []
