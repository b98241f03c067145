"""The one seed rule (flux_flows/seeds.py), everywhere: CLI, tasks, settings, prompt files.

A seed the user gives is the seed the API gets for variant 0, its variants step by one
(wrapping within 1..2^32-1); `base_seed` derives seeds as `seed` used to; neither derives them
from (prompt, variant), exactly as before. Fast: no servers, except the one dry-run flow test.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from flux_flows.models import ImageRequest
from flux_flows.planning.plan import plan_images
from flux_flows.planning.sources import iter_prompts, normalize_prompts
from flux_flows.seeds import MAX_SEED, derive_seed, step_seed
from flux_flows.settings import BatchOptions, BatchSettings
from flux_flows.tasks import build_request

PROMPTS = ["a lighthouse at dusk", "a cat"]


def _old_derive_seed(
    base_seed: int | None, prompt: str, variant: int = 0, *, first: int | None = None
) -> int:
    """flux_flows.seeds.derive_seed as it was before the seed rule (commit 5466ba3), verbatim
    but for the docstring: what `seed=` / `--seed` used to send, and `base_seed` now does."""
    payload = json.dumps([base_seed, prompt, 0], ensure_ascii=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode("ascii")).digest()
    if first is None:
        first = int.from_bytes(digest[:8], "big") % (2**31 - 1) + 1
    if variant == 0:
        return first
    stride = int.from_bytes(digest[8:16], "big") % MAX_SEED
    stride = max(stride, 1)
    while math.gcd(stride, MAX_SEED) != 1:
        stride = stride % (MAX_SEED - 1) + 1
    return (first - 1 + variant * stride) % MAX_SEED + 1


def seeds_of(rows: Any, **settings: Any) -> list[list[int]]:
    """Each prompt's seeds, variant by variant, as a batch with these settings plans them."""
    images = plan_images(rows, BatchSettings(**settings))
    by_index: dict[int, list[int]] = {}
    for planned in images:
        by_index.setdefault(planned.index, []).append(planned.request.seed)
    return [by_index[i] for i in sorted(by_index)]


# --- the task ---------------------------------------------------------------------------


def test_build_request_sends_the_given_seed_and_steps_its_variants() -> None:
    assert build_request.fn("a lighthouse at dusk", seed=7).seed == 7  # was 603351686
    assert [build_request.fn("a lighthouse at dusk", seed=7, variant=v).seed for v in range(3)] == [
        7,
        8,
        9,
    ]


def test_build_request_base_seed_gives_the_old_derived_seeds() -> None:
    for variant in range(4):
        request = build_request.fn("a lighthouse at dusk", base_seed=7, variant=variant)
        assert request.seed == _old_derive_seed(7, "a lighthouse at dusk", variant)
    assert build_request.fn("a lighthouse at dusk", base_seed=7).seed == 603351686


def test_build_request_prompt_seed_wins_and_one_kind_of_seed_only() -> None:
    assert build_request.fn({"prompt": "a fox", "seed": 1000}, seed=7, variant=1).seed == 1001
    assert build_request.fn({"prompt": "a fox", "seed": 1000}, base_seed=7).seed == 1000
    with pytest.raises(ValueError, match="not both"):
        build_request.fn("a fox", seed=7, base_seed=7)


def test_build_request_without_a_seed_is_unchanged() -> None:
    for variant in range(3):
        request = build_request.fn("a fox", variant=variant)
        assert request.seed == _old_derive_seed(None, "a fox", variant)
    assert build_request.fn("a fox").seed == ImageRequest(prompt="a fox").seed == 1191386623


# --- the rule itself ----------------------------------------------------------------------


def test_variants_step_by_one_and_wrap_within_the_api_range() -> None:
    assert [step_seed(7, v) for v in range(3)] == [7, 8, 9]
    assert [step_seed(MAX_SEED - 1, v) for v in range(4)] == [MAX_SEED - 1, MAX_SEED, 1, 2]
    assert step_seed(1, MAX_SEED) == 1  # a full turn of 1..2^32-1, never 0 ("random")
    assert seeds_of(normalize_prompts(["x"]), seed=MAX_SEED, variants=2) == [[MAX_SEED, 1]]


def test_derived_seeds_are_those_of_before() -> None:
    """Images made without a seed keep their cache keys; base_seed gives the old --seed's."""
    for base in (None, 7, 2026):
        for prompt in ("a fox", "ünïcode ☃", "a lighthouse at dusk"):
            for variant in (0, 1, 2, 17):
                assert derive_seed(base, prompt, variant) == _old_derive_seed(base, prompt, variant)


# --- a batch's settings and its expansion --------------------------------------------------


def test_run_expansion_with_a_seed_sends_it_and_steps_the_variants() -> None:
    assert seeds_of(normalize_prompts(PROMPTS), seed=7, variants=3) == [[7, 8, 9], [7, 8, 9]]


def test_run_expansion_with_a_base_seed_derives_as_the_old_seed_did() -> None:
    old = [[_old_derive_seed(7, p, v) for v in range(3)] for p in PROMPTS]
    assert seeds_of(normalize_prompts(PROMPTS), base_seed=7, variants=3) == old
    assert old[0][0] == 603351686


def test_run_expansion_without_a_seed_is_unchanged() -> None:
    old = [[_old_derive_seed(None, p, v) for v in range(3)] for p in PROMPTS]
    assert seeds_of(normalize_prompts(PROMPTS), variants=3) == old


def test_a_csv_row_seed_wins_over_seed_and_base_seed(tmp_path: Path) -> None:
    source = tmp_path / "prompts.csv"
    source.write_text("prompt,seed\na fox,1000\na cat,\n")
    rows = list(iter_prompts(str(source)))
    assert seeds_of(rows, seed=7, variants=3) == [[1000, 1001, 1002], [7, 8, 9]]
    derived = [_old_derive_seed(7, "a cat", v) for v in range(3)]
    assert seeds_of(rows, base_seed=7, variants=3) == [[1000, 1001, 1002], derived]
    unseeded = [_old_derive_seed(None, "a cat", v) for v in range(3)]
    assert seeds_of(rows, variants=3) == [[1000, 1001, 1002], unseeded]


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"seed": 7, "base_seed": 7}, "not both"),
        ({"seed": 0}, "random"),
        ({"seed": MAX_SEED + 1}, "1..4294967295"),
        ({"seed": True}, "must be a number"),
        ({"base_seed": False}, "must be a number"),
    ],
)
def test_settings_refuse_a_seed_no_user_means(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        BatchSettings(**settings)


def test_a_base_seed_may_be_any_integer() -> None:
    """It is only hashed, as `seed` was: 0 and big numbers made valid seeds before."""
    for base in (0, -5, 2**40):
        (seeds,) = seeds_of(normalize_prompts(["x"]), base_seed=base, variants=2)
        assert seeds == [_old_derive_seed(base, "x", v) for v in range(2)]


# --- the CLI ----------------------------------------------------------------------------


def _cli(*args: str) -> Any:
    from flux_flows.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def planned_seeds(monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    """The seeds `flux-flows plan` plans, caught where it hands its rows to the batch code."""
    import flux_flows.planning.plan

    caught: list[list[list[int]]] = []
    real = flux_flows.planning.plan.summarize_plan

    def summarize(rows: Any, settings: BatchSettings, storage: Any) -> Any:
        rows = list(rows)
        images = plan_images(rows, settings)
        caught.append([[p.request.seed for p in images if p.index == i] for i in range(len(rows))])
        return real(rows, settings, storage)

    monkeypatch.setattr(flux_flows.planning.plan, "summarize_plan", summarize)
    return caught


def test_cli_plan_seed_is_sent_as_is(tmp_path: Path, planned_seeds: list[Any]) -> None:
    to = str(tmp_path / "out")
    done = _cli("plan", "--prompt", "a lighthouse at dusk", "--seed", "7", "-n", "3", "--to", to)
    assert done.exit_code == 0, done.output
    done = _cli("plan", "--prompt", "a lighthouse at dusk", "--base-seed", "7", "--to", to)
    assert done.exit_code == 0, done.output
    assert planned_seeds == [[[7, 8, 9]], [[603351686]]]


def test_cli_plan_refuses_seed_with_base_seed(tmp_path: Path) -> None:
    done = _cli("plan", "--prompt", "x", "--seed", "7", "--base-seed", "7", "--to", str(tmp_path))
    assert done.exit_code == 2
    assert "not both" in done.output


def test_cli_run_passes_the_seed_kinds_to_the_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `run` hands the flow, planned as the flow plans it (BatchOptions.from_params)."""
    import typer

    import flux_flows.cli.batch
    import flux_flows.flows

    passed: list[tuple[Any, Any, Any]] = []

    def flow(prompts: list[str], to: str, **settings: Any) -> None:
        options = BatchOptions.from_params(settings)
        planned = seeds_of(normalize_prompts(prompts), **options.model_dump())
        passed.append((settings.get("seed"), settings.get("base_seed"), planned))

    def run_flow(start: Any, **_: Any) -> Any:
        start()
        raise typer.Exit(0)

    monkeypatch.setattr(flux_flows.flows, "generate_images", flow)
    monkeypatch.setattr(flux_flows.cli.batch, "run_flow", run_flow)
    to = str(tmp_path / "out")
    for seed_args in (["--seed", "7"], ["--base-seed", "7"]):
        done = _cli("run", "--prompt", "a lighthouse at dusk", *seed_args, "-n", "3", "--to", to)
        assert done.exit_code == 0, done.output
    derived = [_old_derive_seed(7, "a lighthouse at dusk", v) for v in range(3)]
    assert passed == [(7, None, [[7, 8, 9]]), (None, 7, [derived])]


# --- the flow, end to end (a Prefect API and the emulator) ---------------------------------


def test_flow_dry_run_records_the_given_seed(tmp_path: Path, flow_env: Any) -> None:
    from flux_flows.flows import generate_images

    report = generate_images(PROMPTS, str(tmp_path), seed=7, variants=3, dry_run=True)
    assert [(r.index, r.variant, r.seed) for r in report.records] == [
        (i, v, 7 + v) for i in range(2) for v in range(3)
    ]
    assert flow_env.stats.requests == 0
