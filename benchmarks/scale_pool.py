"""bench_scale.py row (d): a process work pool, the chunk deployment and 2 process workers,
made as deployments/README.md tells a user, and the evidence that the chunks ran on them."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.procs import REPO, Processes
from harness.services import StandinServices

# The pool and chunk deployment exactly as deployments/prefect.yaml declares them.
WORK_POOL = "flux-flows-pool"
CHUNK_DEPLOYMENT = "render-chunk/flux-flows-chunks"
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
POOL_READY_S = 180.0  # deploy + 2 workers registering, on 2 busy cores


def _pool_state(api_url: str) -> dict[str, Any]:
    """The pool's workers (online ones) and the chunk deployment, as the Prefect API sees them."""
    import httpx

    with httpx.Client(base_url=api_url.rstrip("/") + "/", timeout=10.0) as http:
        answer = http.post(f"work_pools/{WORK_POOL}/workers/filter", json={})
        workers = answer.json() if answer.status_code == 200 else []
        answer = http.get(f"deployments/name/{CHUNK_DEPLOYMENT}")
        deployment = answer.json() if answer.status_code == 200 else None
    return {
        "online": sorted(w["name"] for w in workers if w.get("status") == "ONLINE"),
        "deployment": deployment,
    }


def _prefect_step(env: dict[str, str], *args: str) -> str | None:
    """One `prefect ...` command from the project root; why it failed, or None."""
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=300,
    )
    if done.returncode == 0:
        return None
    return f"{' '.join(args[:3])} failed: {(done.stdout + done.stderr).strip()[-300:]}"


@contextlib.contextmanager
def work_pool_workers(
    svc: StandinServices, procs: Processes, workdir: Path
) -> Iterator[str | None]:
    """Row (d): a process pool, the chunk deployment and 2 process workers, as
    deployments/README.md (section 8) tells a user; yields None once both workers are online and
    the deployment is on the pool, else why not (the other rows still count)."""
    prefect = [sys.executable, "-m", "prefect"]

    def step(*args: str) -> str | None:
        return _prefect_step(svc.env, *args)

    why = step("work-pool", "create", WORK_POOL, "--type", "process", "--overwrite")
    if why:
        yield why
        return
    # What a worker host provides (as tests/test_deployment.py's worker_env): the Prefect API,
    # the stand-in's URL and key; polled every second so a chunk does not wait 10 s for a worker.
    # They start while the deployment is made: both take seconds of start-up.
    env = {**svc.env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    command = [*prefect, "worker", "start", "--pool", WORK_POOL, "--type", "process"]
    workers = [
        procs.spawn(f"worker-{i}", [*command, "--name", f"bench-worker-{i}"], env) for i in range(2)
    ]
    try:
        # The documented command, only this one deployment (the others need S3 feeds).
        why = step(
            "--no-prompt", "deploy", "--prefect-file", str(PREFECT_FILE), "--name",
            CHUNK_DEPLOYMENT.partition("/")[2],
        )  # fmt: skip
        api_url = svc.env["PREFECT_API_URL"]
        deployment = _pool_state(api_url)["deployment"]
        if not why and (not deployment or deployment.get("work_pool_name") != WORK_POOL):
            why = f"{CHUNK_DEPLOYMENT} is not on {WORK_POOL} after prefect deploy: {deployment}"
        if why:
            yield why
            return
        deadline = time.monotonic() + POOL_READY_S
        while len(_pool_state(api_url)["online"]) < len(workers):
            dead = [w for w in workers if w.poll() is not None]
            if dead or time.monotonic() > deadline:
                names = ", ".join(_pool_state(api_url)["online"]) or "none"
                why = f"{len(dead)} worker(s) exited" if dead else "timed out"
                yield f"workers not online ({why}; online: {names}; logs in {workdir})"
                return
            time.sleep(0.5)
        svc.workers = [w.pid for w in workers]
        yield None
    finally:
        for worker in workers:
            procs.stop(worker)
        svc.workers = []


def chunk_runs(api_url: str, procs: Processes) -> dict[str, Any]:
    """The chunk deployment's flow runs by final state (warm-up included), and how many runs each
    worker took (from the workers' logs): evidence that row (d) ran on the pool, on both."""
    import httpx

    with httpx.Client(base_url=api_url.rstrip("/") + "/", timeout=30.0) as http:
        answer = http.post(
            "flow_runs/filter",
            json={"deployments": {"name": {"any_": [CHUNK_DEPLOYMENT.partition("/")[2]]}}},
        )
        answer.raise_for_status()
        states = Counter(str((r.get("state") or {}).get("type")) for r in answer.json())
    per_worker = {
        f"worker-{i}": procs.log_tail(f"worker-{i}", 100_000).count("submitted to infrastructure")
        for i in range(2)
    }
    return {"chunk_states": dict(states), "chunks_per_worker": per_worker}
