"""ImageRequest validation, cache-key identity and seed derivation."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from flux_flows.models import (
    ASPECT_RATIO_SIZES,
    DEV,
    SCHNELL,
    ImageRequest,
    derive_seed,
    describe_validation_error,
)
from flux_flows.results import GeneratedImage, ImageRecord


def problems(**fields: object) -> str:
    with pytest.raises(ValidationError) as info:
        ImageRequest(**fields)  # type: ignore[arg-type]
    return describe_validation_error(info.value)


def test_defaults_follow_the_contract() -> None:
    request = ImageRequest(prompt="a fox")
    assert request.model == SCHNELL
    assert request.aspect_ratio == "1:1"
    assert request.guidance_scale == 3.5
    assert request.num_inference_steps == 4
    assert request.safety_check is False
    assert request.output_format == "jpeg"
    assert ImageRequest(prompt="a fox", model=DEV).num_inference_steps == 28


def test_prompt_is_stripped_and_must_not_be_empty() -> None:
    assert ImageRequest(prompt="  a fox \n").prompt == "a fox"
    assert problems(prompt="   ").startswith("prompt:")
    assert problems(prompt="").startswith("prompt:")
    assert "prompt" in problems()
    assert "NUL" in problems(prompt="a\x00b")


@pytest.mark.parametrize("ratio", sorted(ASPECT_RATIO_SIZES))
def test_every_published_aspect_ratio_is_accepted(ratio: str) -> None:
    assert ImageRequest(prompt="x", aspect_ratio=ratio).size == ASPECT_RATIO_SIZES[ratio]


@pytest.mark.parametrize("ratio", ["7:3", "1x1", "", "16:10"])
def test_unknown_aspect_ratio_names_field_and_allowed_values(ratio: str) -> None:
    message = problems(prompt="x", aspect_ratio=ratio)
    assert message.startswith("aspect_ratio:")
    assert "'21:9'" in message and "'9:16'" in message


def test_model_must_be_a_flux_model() -> None:
    message = problems(prompt="x", model="sdxl")
    assert message.startswith("model:") and SCHNELL in message and DEV in message


@pytest.mark.parametrize(
    ("model", "good", "bad"), [(SCHNELL, [1, 12], [0, 13, 51]), (DEV, [1, 28, 50], [0, 51])]
)
def test_steps_range_depends_on_model(model: str, good: list[int], bad: list[int]) -> None:
    for steps in good:
        assert (
            ImageRequest(prompt="x", model=model, num_inference_steps=steps).num_inference_steps
            == steps
        )
    for steps in bad:
        assert problems(prompt="x", model=model, num_inference_steps=steps).startswith(
            "num_inference_steps:"
        )


@pytest.mark.parametrize("value", [0, -1, 20.01, "a lot"])
def test_guidance_range(value: object) -> None:
    assert problems(prompt="x", guidance_scale=value).startswith("guidance_scale:")
    assert ImageRequest(prompt="x", guidance_scale=20).guidance_scale == 20.0


@pytest.mark.parametrize("value", [-5, 2**32, "seven"])
def test_seed_range(value: object) -> None:
    assert problems(prompt="x", seed=value).startswith("seed:")


def test_seed_zero_is_refused_because_it_means_random() -> None:
    assert "random" in problems(prompt="x", seed=0)


def test_missing_seed_is_derived_from_the_prompt_never_zero() -> None:
    a, b = ImageRequest(prompt="a fox"), ImageRequest(prompt="a fox")
    assert a.seed == b.seed == derive_seed(None, "a fox", 0)
    assert a.seed != ImageRequest(prompt="a cat").seed
    assert ImageRequest(prompt="a fox", seed=None).seed == a.seed


def test_output_format_and_unknown_fields() -> None:
    assert problems(prompt="x", output_format="webp").startswith("output_format:")
    assert problems(prompt="x", samples=2).startswith("samples:")
    assert ImageRequest(prompt="x", output_format="png").content_type == "image/png"


def test_csv_style_strings_are_converted() -> None:
    request = ImageRequest.model_validate(
        {"prompt": "x", "seed": "42", "num_inference_steps": "8", "safety_check": "true"}
    )
    assert (request.seed, request.num_inference_steps, request.safety_check) == (42, 8, True)


def test_derived_seeds_are_stable_distinct_and_in_range() -> None:
    seeds = {
        derive_seed(base, p, v) for base in (None, 1, 2) for p in ("a", "b") for v in range(50)
    }
    assert len(seeds) == 3 * 2 * 50
    assert all(1 <= s <= 2**32 - 1 for s in seeds)
    assert derive_seed(7, "fox", 3) == derive_seed(7, "fox", 3)


@pytest.mark.parametrize(
    ("base", "prompt", "seed"),
    [
        (None, "a fox", 1191386623),
        (7, "fox", 154776326),
        (2026, "a red fox in snow", 324937635),
        (None, "ünïcode ☃", 173516436),
    ],
)
def test_variant_zero_seeds_are_unchanged(base: int | None, prompt: str, seed: int) -> None:
    """Images already stored under variant 0 keep their cache keys (figures from 0.x)."""
    assert derive_seed(base, prompt, 0) == seed


def test_variants_of_one_prompt_never_share_a_seed() -> None:
    """Hashing each variant alone gave 199,988 distinct seeds for 200,000 variants."""
    seeds = [derive_seed(None, "one prompt", v) for v in range(200_000)]
    assert len(set(seeds)) == 200_000
    assert min(seeds) >= 1 and max(seeds) <= 2**32 - 1
    assert seeds[0] == derive_seed(None, "one prompt", 0)


def test_seeds_across_prompts_collide_only_as_the_32_bit_range_allows() -> None:
    """2,000 prompts x 100 variants: ~4.7 shared seeds expected among 200,000 in 2^32 (6 here);
    each prompt's own 100 are distinct, and variants spread over the whole 32-bit range."""
    seeds = []
    for p in range(2_000):
        own = [derive_seed(None, f"p{p}", v) for v in range(100)]
        assert len(set(own)) == 100
        seeds += own
    assert len(seeds) - len(set(seeds)) <= 12
    assert sum(s >= 2**31 for s in seeds) > 0.4 * len(seeds)


PIXEL_FIELDS = {
    "prompt": "a cat",
    "model": DEV,
    "aspect_ratio": "16:9",
    "guidance_scale": 4.0,
    "num_inference_steps": 5,
    "seed": 99,
    "safety_check": True,
    "output_format": "png",
}


@pytest.mark.parametrize("field", sorted(PIXEL_FIELDS))
def test_every_pixel_changing_field_changes_the_cache_key(field: str) -> None:
    base = ImageRequest(prompt="a fox", seed=1)
    changed = ImageRequest(**{**base.model_dump(), field: PIXEL_FIELDS[field]})
    assert changed.cache_key != base.cache_key


def test_equal_requests_share_a_key_regardless_of_spelling() -> None:
    a = ImageRequest(prompt="a fox", seed=5, guidance_scale=3.5)
    b = ImageRequest(prompt=" a fox ", seed="5", guidance_scale="3.50")
    assert a.cache_key == b.cache_key
    assert len(a.cache_key) == 32


def test_cache_key_is_stable_across_processes() -> None:
    code = (
        "from flux_flows.models import ImageRequest;"
        "print(ImageRequest(prompt='héllo wörld', seed=123, aspect_ratio='3:2').cache_key)"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    local = ImageRequest(prompt="héllo wörld", seed=123, aspect_ratio="3:2").cache_key
    assert keys == {local}


def test_generated_image_repr_hides_bytes() -> None:
    image = GeneratedImage(
        request=ImageRequest(prompt="x"),
        data=b"\xff" * 10_000,
        content_type="image/jpeg",
        seed=1,
        finish_reason="SUCCESS",
        width=1,
        height=1,
    )
    assert len(repr(image)) < 1000
    assert image.size_bytes == 10_000


def test_record_round_trips_to_the_same_request() -> None:
    request = ImageRequest(**PIXEL_FIELDS)
    record = ImageRecord.for_request(
        request, index=3, variant=1, finish_reason="ERROR", error="boom"
    )
    assert record.cache_key == request.cache_key
    assert record.to_request() == request
    assert ImageRecord.model_validate_json(record.model_dump_json()) == record


def test_variants_of_a_row_with_its_own_seed_step_from_it() -> None:
    from flux_flows.models import request_for

    seeds = [request_for({"prompt": "a fox", "seed": 7}, variant=v).seed for v in range(1000)]
    assert seeds[0] == 7 and len(set(seeds)) == 1000
