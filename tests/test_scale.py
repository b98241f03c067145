"""Batches past what fits in a parameter or in memory (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client

from flux_flows import FinishReason, generate_images


def test_a_list_too_big_for_a_flow_parameter_is_staged_and_runs(
    tmp_path: Path, flow_env: Any
) -> None:
    """20,000 prompts (~1 MB of JSON, twice Prefect's parameter cap) plan like any list."""
    prompts: list[Any] = [
        f"a staged lighthouse number {i} with a long tail of words" for i in range(20_000)
    ]
    prompts[7] = {"prompt": "an override", "seed": 7, "id": "sku-7"}
    state = generate_images(prompts, str(tmp_path), dry_run=True, return_state=True)
    report = state.result()
    assert report.counts[FinishReason.PLANNED] == 20_000 and flow_env.stats.requests == 0
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    staged = run.parameters["staged_prompts"]
    assert run.parameters["prompts"] == []
    assert staged.startswith(str(tmp_path / "runs")) and staged.endswith("/prompts.jsonl")
    lines = Path(staged).read_text().splitlines()
    assert len(lines) == 20_000 and json.loads(lines[7]) == {
        "prompt": "an override",
        "seed": 7,
        "id": "sku-7",
    }
    assert len(json.dumps(run.parameters)) < 10_000  # readable, nowhere near the cap


def test_a_small_list_is_a_plain_parameter(tmp_path: Path, flow_env: Any) -> None:
    state = generate_images(["a small fox"], str(tmp_path), dry_run=True, return_state=True)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.parameters["prompts"] == ["a small fox"]
    assert run.parameters.get("staged_prompts") is None
    assert not (tmp_path / "runs").exists()


def test_a_bad_prompt_in_a_big_list_is_named_before_anything_is_written(
    tmp_path: Path, flow_env: Any
) -> None:
    import pytest

    prompts: list[Any] = [
        f"a long staged prompt about lighthouses number {i}" for i in range(8_000)
    ]
    prompts[4321] = {"prompt": "x", "colour": "red"}
    with pytest.raises(ValueError, match=r"prompts\[4321\]: unknown field 'colour'"):
        generate_images(prompts, str(tmp_path), dry_run=True)
    assert not (tmp_path / "runs").exists()
