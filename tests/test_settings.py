"""The one list of knobs (settings.py) and every place that takes them: nothing can drift."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
from pydantic import ValidationError

from flux_flows import generate_images, generate_images_from_file, replay_failed
from flux_flows.settings import BATCH_DEFAULTS, SETTING_FIELDS, BatchOptions, BatchSettings

SOURCES = {"prompts", "source", "destination", "credentials", "aws_credentials", "staged_prompts"}


@pytest.mark.parametrize("flow", [generate_images, generate_images_from_file])
def test_batch_flow_signatures_are_the_settings(flow: Any) -> None:
    """Prefect needs every parameter in the signature; each must be a setting with its default."""
    parameters = inspect.signature(flow.fn).parameters
    knobs = {name: p.default for name, p in parameters.items() if name not in SOURCES}
    assert set(knobs) == set(SETTING_FIELDS)
    assert knobs == {name: getattr(BATCH_DEFAULTS, name) for name in SETTING_FIELDS}


def test_replay_takes_a_subset_of_the_settings_with_their_defaults() -> None:
    parameters = inspect.signature(replay_failed.fn).parameters
    knobs = {
        name: p.default
        for name, p in parameters.items()
        if name not in {"manifest_uri", "include_skipped", *SOURCES}
    }
    assert set(knobs) <= set(SETTING_FIELDS)
    assert knobs == {name: getattr(BATCH_DEFAULTS, name) for name in knobs}


def test_cli_run_and_plan_defaults_are_the_settings_defaults() -> None:
    from flux_flows.cli import batch

    for command in (batch.run, batch.plan):
        parameters = inspect.signature(command).parameters
        assert parameters["model"].default == BATCH_DEFAULTS.model
        assert parameters["guidance"].default == BATCH_DEFAULTS.guidance_scale
        assert parameters["budget"].default == BATCH_DEFAULTS.budget_usd
    assert (
        inspect.signature(batch.run).parameters["concurrency"].default
        == 8
        == (BATCH_DEFAULTS.max_concurrency)
    )


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("variants", 0, "variants must be at least 1"),
        ("variants", True, "variants must be a number, got True"),
        ("max_concurrency", 0, "max_concurrency must be at least 1"),
        ("requests_per_minute", 0, "requests_per_minute must be positive"),
        ("requests_per_minute", math.nan, "requests_per_minute must be a finite number"),
        ("requests_per_minute", math.inf, "requests_per_minute must be a finite number"),
        ("budget_usd", -1, "budget_usd must not be negative"),
        ("budget_usd", math.nan, "budget_usd must be a finite number"),
    ],
)
def test_settings_refuse_what_no_user_means(field: str, value: Any, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        BatchSettings(**{field: value})


def test_options_take_their_fields_from_any_parameters() -> None:
    options = BatchOptions.from_params(
        {
            "destination": "s3://b/p",
            "variants": 3,
            "prompts": ["ignored"],
            "model": "flux-1-dev-fp8",
        }
    )
    assert (options.destination, options.variants) == ("s3://b/p", 3)
    assert options.as_defaults()["model"] == "flux-1-dev-fp8"
    assert set(options.as_defaults()) == set(BatchSettings.model_fields) & set(
        options.as_defaults()
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, 120.0),
        ("", 120.0),
        ("abc", 120.0),
        ("0", 120.0),
        ("-5", 120.0),
        ("inf", 120.0),
        ("nan", 120.0),
        ("7.5", 7.5),
        ("2", 5.0),
    ],
)
def test_duration_knobs_from_the_environment(
    raw: str | None, expected: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases and heartbeats read one way: nonsense falls back to the default, never to 0."""
    from flux_flows.settings import seconds_from_env

    if raw is None:
        monkeypatch.delenv("FLUX_FLOWS_TEST_SECONDS", raising=False)
    else:
        monkeypatch.setenv("FLUX_FLOWS_TEST_SECONDS", raw)
    assert seconds_from_env("FLUX_FLOWS_TEST_SECONDS", 120.0, minimum=5.0) == expected
