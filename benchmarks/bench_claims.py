"""What the per-image lease costs (issue 21), beside what storing the image costs, in one run.

For N images, on a local folder and on a moto S3 server (its own process, loopback), times:

- `store`: one `put` of a 300 KB body per image (what every generated image costs anyway);
- `lease`: what `render.render` adds per image: `claims.acquire` (a conditional create, and the
  holder file on the first one), `render.found_stored` (two HEADs) and `Lease.release` (a delete).

Prints wall and process-CPU microseconds per image for each, the ratio lease/store, and a RESULT
line. Single-threaded, so wall time is the round trips; the machine is shared, so compare the two
rows of one run, not across runs.

    python benchmarks/bench_claims.py --n 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from harness.procs import Processes
from harness.report import stamp
from harness.servers import base_env, start_moto
from harness.timing import timed

from flux_flows.models import ImageRequest
from flux_flows.planning import claims
from flux_flows.rendering.one_image import found_stored
from flux_flows.storage import LocalStorage, S3Storage, Storage
from flux_flows.storage.s3_client import clear_s3_client_cache


def _timed(n: int, step: Callable[[int], None], exclude: list[int]) -> tuple[float, float]:
    """(wall µs, client CPU µs) per call of `step` over n calls; moto (`exclude`) not billed."""
    with timed(exclude=exclude) as t:
        for i in range(n):
            step(i)
    return t.wall_s / n * 1e6, t.cpu_s / n * 1e6


def measure(
    storage: Storage, n: int, body: bytes, exclude: list[int] | None = None
) -> dict[str, float]:
    requests = [ImageRequest(prompt=f"a benchmarked heron {i}", seed=i + 1) for i in range(n)]
    keys = [r.cache_key for r in requests]

    def store(i: int) -> None:
        storage.put(f"bench-store/{keys[i]}.jpg", body, content_type="image/jpeg")

    def lease(i: int) -> None:
        held = claims.acquire(storage, "bench-run", keys[i])
        assert isinstance(held, claims.Lease)
        assert found_stored(storage, requests[i], keys[i]) is None
        held.release()

    store_wall, store_cpu = _timed(n, store, exclude or [])
    lease_wall, lease_cpu = _timed(n, lease, exclude or [])
    claims.close_heartbeat(storage, "bench-run")
    return {
        "store_wall_us": store_wall,
        "store_cpu_us": store_cpu,
        "lease_wall_us": lease_wall,
        "lease_cpu_us": lease_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--image-kb", type=int, default=300)
    args = parser.parse_args()
    print(
        f"bench_claims: {stamp()}; {os.cpu_count()} cores; load average "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        flush=True,
    )
    body = os.urandom(args.image_kb * 1024)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        rows["local"] = measure(LocalStorage(folder), args.n, body)
    workdir = Path(tempfile.mkdtemp(prefix="bench-claims-"))
    procs = Processes(workdir)
    try:
        moto = start_moto(procs, base_env())
        endpoint = moto.ready()
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        clear_s3_client_cache()
        import boto3

        boto3.client("s3").create_bucket(Bucket="flux-bench-claims")
        s3 = S3Storage("flux-bench-claims")
        rows["s3"] = measure(s3, max(1, args.n // 4), body, exclude=[moto.pid])
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'store':>6} {'row':>5} {'wall us':>9} {'cpu us':>8}")
    result = []
    for name, row in rows.items():
        for what in ("store", "lease"):
            wall, cpu = row[f"{what}_wall_us"], row[f"{what}_cpu_us"]
            print(f"{name:>6} {what:>5} {wall:9.0f} {cpu:8.0f}")
        ratio = row["lease_wall_us"] / row["store_wall_us"]
        cpu_ratio = row["lease_cpu_us"] / row["store_cpu_us"]
        result += [
            f"{name}_lease_wall_us={row['lease_wall_us']:.0f}",
            f"{name}_lease_cpu_us={row['lease_cpu_us']:.0f}",
            f"{name}_lease_vs_store_wall={ratio:.2f}",
            f"{name}_lease_vs_store_cpu={cpu_ratio:.2f}",
        ]
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
