"""What a run holds per image, object by object (tracemalloc), and what rebuilding a request costs.

The per-image state of a batch is one `PlannedImage` per planned image and one `RenderResult`
per generated image. Both used to be pydantic models; this measures, in one process, the bytes
tracemalloc attributes to N of each kind kept alive in a list (the list's own slots excluded):

- `ImageRequest` (pydantic, validated by `models.request_for`): what the plan used to keep;
- `PlannedImage` (slotted dataclass): what the plan keeps now, once its request is dropped;
- `RenderResult` (slotted dataclass), filled as a stored SUCCESS image's is;
- the same fields as a pydantic model (`model_validate`): what a pydantic RenderResult costs
  (an equivalent model made here, not the library's old class, which no longer exists);

and the CPU time of `PlannedImage.request` (the model rebuilt without validation) per call.
The prompts are distinct, about 70 characters, as in the other benchmarks.

    python benchmarks/bench_sizes.py --n 20000
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's flux_flows, not an installed one

import pydantic  # noqa: E402
from harness.report import stamp  # noqa: E402
from harness.timing import timed  # noqa: E402

from flux_flows.models import FinishReason, request_for  # noqa: E402
from flux_flows.planning.plan import PlannedImage  # noqa: E402
from flux_flows.rendering.one_image import RenderResult  # noqa: E402

DEFAULTS: dict[str, Any] = {"model": "flux-1-schnell-fp8", "aspect_ratio": "1:1"}


def prompt(i: int) -> str:
    return f"benchmark image {i}: a watercolor lighthouse at dusk, soft light, high detail"


def bytes_each(n: int, make: Callable[[int], Any]) -> float:
    """Bytes tracemalloc sees for n objects made by `make` and kept, over n (list slots out)."""
    gc.collect()
    tracemalloc.start()
    kept: list[Any] = [None] * n  # the list's slots are allocated before the baseline
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        kept[i] = make(i)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del kept
    return used / n


def result_fields(i: int) -> dict[str, Any]:
    return {
        "cache_key": f"{i:064x}",
        "finish_reason": FinishReason.SUCCESS,
        "object_key": f"images/{i:064x}.jpg",
        "thumbnail": True,
        "width": 1024,
        "height": 1024,
        "content_type": "image/jpeg",
        "size_bytes": 300_000 + i,
        "request_id": f"req-{i:08d}",
        "latency_s": 1.0 + i / 1e6,
        "api_calls": 1,
    }


class PydanticResult(pydantic.BaseModel):
    """RenderResult's fields as a pydantic model, for the comparison only."""

    cache_key: str
    finish_reason: FinishReason
    object_key: str | None = None
    thumbnail: bool = False
    spill_path: str | None = None
    recovered_from_spill: bool = False
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    size_bytes: int | None = None
    request_id: str | None = None
    latency_s: float | None = None
    api_calls: int = 0
    throttled: int = 0
    error: str | None = None
    already_stored: bool = False
    taken_by: str | None = None


def header() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"bench_sizes: {stamp()}; "
        f"python {sys.version.split()[0]}, pydantic {pydantic.VERSION}; load average {load}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="objects of each kind")
    parser.add_argument("--calls", type=int, default=20_000, help="calls of PlannedImage.request")
    args = parser.parse_args()
    n = args.n
    print(header(), flush=True)

    def request(i: int) -> Any:
        return request_for(prompt(i), defaults=DEFAULTS, seed=i + 1)

    # Made before measuring, so only the kept objects are counted, not the requests they came from.
    requests = [request(i) for i in range(n)]
    sizes = {
        "ImageRequest (pydantic, validated)": bytes_each(n, request),
        "PlannedImage (slotted dataclass)": bytes_each(
            n, lambda i: PlannedImage.of(i, 0, requests[i])
        ),
        "RenderResult (slotted dataclass)": bytes_each(
            n, lambda i: RenderResult(**result_fields(i))
        ),
        "the same fields as a pydantic model": bytes_each(
            n, lambda i: PydanticResult.model_validate(result_fields(i))
        ),
    }
    planned = [PlannedImage.of(i, 0, requests[i]) for i in range(min(n, args.calls))]
    with timed() as t:
        for i in range(args.calls):
            planned[i % len(planned)].request  # noqa: B018 (the property is what is timed)
    rebuild_us = t.cpu_s / args.calls * 1e6

    print(f"{'kept per image, N=' + str(n):44} {'bytes':>8}")
    for name, size in sizes.items():
        print(f"{name:44} {size:8.0f}")
    print(f"{'PlannedImage.request, CPU per call':44} {rebuild_us:8.2f} us")
    values = list(sizes.values())
    print(
        f"RESULT n={n} request_model_b={values[0]:.0f} planned_image_b={values[1]:.0f} "
        f"render_result_b={values[2]:.0f} pydantic_result_b={values[3]:.0f} "
        f"request_rebuild_us={rebuild_us:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
