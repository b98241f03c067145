"""The prompts the contenders generate: the same work for every contender of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SUBJECTS = ("lighthouse", "fox", "teapot", "glacier", "bicycle", "orchard", "robot", "harbor")
MODEL = "flux-1-schnell-fp8"
GENERATION_PATH = f"/workflows/accounts/fireworks/models/{MODEL}/text_to_image"


def workload(n: int, tag: str = "") -> list[dict[str, Any]]:
    """N distinct prompts with explicit seeds: identical requests (and images) in every phase."""
    return [
        {
            "prompt": f"{tag}benchmark image {i}: a watercolor {SUBJECTS[i % len(SUBJECTS)]} "
            "at dusk, soft light, high detail",
            "seed": i + 1,
        }
        for i in range(n)
    ]


def prompts_for(n: int, tag: str = "") -> list[str]:
    """N distinct plain-string prompts (the form the scale issue's "before" figures used)."""
    return [
        f"{tag}scale image {i}: a watercolor {SUBJECTS[i % len(SUBJECTS)]} at dusk, soft light"
        for i in range(n)
    ]


def api_body(job: dict[str, Any]) -> dict[str, Any]:
    """What the library sends for such a job (see ImageRequest.api_body), so the work is equal."""
    return {
        "prompt": job["prompt"],
        "aspect_ratio": "1:1",
        "guidance_scale": 3.5,
        "num_inference_steps": 4,
        "seed": job["seed"],
        "safety_check": False,
    }


def write_prompt_file(path: Path, rows: int) -> None:
    """A `.txt` plan of `rows` prompts, written in blocks (a million rows stay cheap)."""
    with path.open("w") as f:
        for start in range(0, rows, 10_000):
            f.write(
                "".join(
                    f"plan row {i}: a watercolor {SUBJECTS[i % len(SUBJECTS)]} at dusk, soft light\n"
                    for i in range(start, min(rows, start + 10_000))
                )
            )
