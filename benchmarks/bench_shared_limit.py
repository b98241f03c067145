"""Shared account limits (issue 27): what a Prefect concurrency or rate limit costs a batch.

Side by side in one run, against the same stand-in API, `prefect server start` and local folders
as `bench_scale.py` (both from `harness`), each row a fresh process per run of N images
with `--concurrency` in flight:

- (a) no shared limit;
- (b) `concurrency_limit=` a global concurrency limit of `--concurrency` slots;
- (c) two runs at once sharing that limit (each asks for `--concurrency` in flight);
- (d) `rate_limit=` a limit with slot decay well above what the run reaches (what taking
  tokens costs when the limit does not bind);
- (e) two runs at once sharing a rate limit that binds (`--rpm` requests a minute), whose
  pace the stand-in's arrival times give.

Every limit is made with Prefect's own CLI, as the README says to: `prefect gcl create NAME
--limit N [--slot-decay-per-second D]`. Each child does a 2-image warm-up run, reports ready, and
starts its measured run when the orchestrator says go (all runs of a row together); client CPU
(as `harness.cpu` defines it) is each child's over its measured run, Prefect-server CPU is the server's
process tree from "go" until it is quiet again after the last run, over the row's images.

Usage:
    python benchmarks/bench_shared_limit.py                  # N=2000, 0.05 s, 32 in flight
    python benchmarks/bench_shared_limit.py --n 500 --rpm 3000  # quick

The last line is machine-readable: RESULT key=value ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.cpu import settle, tree_cpu_s
from harness.procs import Processes, child_parser, run_script
from harness.report import git_state, uptime_text
from harness.servers import standin_requests
from harness.services import StandinServices, standin_services
from harness.timing import timed
from harness.workload import prompts_for

HERE = Path(__file__).resolve()
CHILD_TIMEOUT_S = 1800.0
READY_TIMEOUT_S = 600.0


# ============================================================================================
# Child role: one run, started on a signal file
# ============================================================================================


def run_child(argv: Sequence[str]) -> None:
    parser = child_parser("bench_shared_limit.py _run")
    parser.add_argument("--tag", default="")
    parser.add_argument("--concurrency-limit", default=None)
    parser.add_argument("--rate-limit", default=None)
    parser.add_argument("--go-file", required=True)
    args = parser.parse_args(argv)

    from flux_flows.flows import generate_images

    limits = {"concurrency_limit": args.concurrency_limit, "rate_limit": args.rate_limit}
    warm = generate_images(
        prompts_for(2, f"warm-up {args.tag}"), args.dest + "-warmup", max_concurrency=2, **limits
    )
    assert warm.counts.get("SUCCESS") == 2, warm.counts
    prompts = prompts_for(args.n, args.tag)
    Path(args.result_file + ".ready").write_text("ready")
    go = Path(args.go_file)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not go.exists():  # the orchestrator's start signal: a poll, in a benchmark only
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.01)
    with timed() as t:
        report = generate_images(prompts, args.dest, max_concurrency=args.concurrency, **limits)
    out = {
        "wall_s": t.wall_s,
        "cpu_s": t.cpu_s,
        "started": t.started,
        "counts": {str(k): v for k, v in report.counts.items() if v},
        "api_calls": report.api_calls,
    }
    Path(args.result_file).write_text(json.dumps(out))


# ============================================================================================
# Orchestrator
# ============================================================================================


def gcl_create(env: dict[str, str], name: str, limit: int, decay: float = 0.0) -> str:
    """Prefect's own CLI, as documented; returns the command."""
    command = ["prefect", "gcl", "create", name, "--limit", str(limit)]
    if decay:
        command += ["--slot-decay-per-second", f"{decay:g}"]
    subprocess.run(
        [sys.executable, "-m", *command], env=env, check=True, capture_output=True, timeout=300
    )
    return " ".join(command)


def _wait_ready(
    procs: Processes, name: str, key: str, children: list[tuple[subprocess.Popen[bytes], Path]]
) -> None:
    """Until every run of a row has done its warm-up and said so (a poll, in a benchmark)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for r, (proc, result) in enumerate(children):
        while not Path(str(result) + ".ready").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{procs.log_tail(f'{key}-{r}')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready")
            time.sleep(0.05)


def row(
    procs: Processes,
    svc: StandinServices,
    workdir: Path,
    name: str,
    *,
    runs: int,
    n: int,
    concurrency: int,
    limits: dict[str, str],
) -> dict[str, Any]:
    key = name.split()[0].strip("()")  # "a", "b"...: file and process names
    go = workdir / f"{key}.go"
    children = []
    for r in range(runs):
        result = workdir / f"{key}-{r}.json"
        command = [sys.executable, str(HERE), "_run", "--n", str(n)]
        command += ["--concurrency", str(concurrency), "--dest", str(workdir / f"{key}-{r}")]
        command += ["--tag", f"{name} run {r} ", "--go-file", str(go)]
        command += ["--result-file", str(result)]
        for option, value in limits.items():
            command += [f"--{option}", value]
        children.append((procs.spawn(f"{key}-{r}", command, svc.env), result))
    _wait_ready(procs, name, key, children)
    settle(svc.server_pid)
    server0, requests0 = tree_cpu_s(svc.server_pid), standin_requests(svc.standin_url)
    go.write_text("go")
    outs = []
    for proc, result in children:
        code = proc.wait(CHILD_TIMEOUT_S)
        if code != 0 or not result.exists():
            raise RuntimeError(f"{name} failed (exit {code})")
        outs.append(json.loads(result.read_text()))
    settle(svc.server_pid)
    images = runs * n
    first = min(o["started"] for o in outs)
    wall = max(o["started"] + o["wall_s"] for o in outs) - first
    stats = {
        "name": name,
        "runs": runs,
        "images": images,
        "wall_s": wall,
        "img_s": images / wall,
        "client_ms": 1000 * sum(o["cpu_s"] for o in outs) / images,
        "server_ms": 1000 * (tree_cpu_s(svc.server_pid) - server0) / images,
        "requests": standin_requests(svc.standin_url) - requests0,
        "success": sum(o["counts"].get("SUCCESS", 0) for o in outs),
        "api_calls": sum(o["api_calls"] for o in outs),
    }
    print(
        f"  {name:<52} {images:>6} {wall:>7.1f} {stats['img_s']:>7.1f} "
        f"{stats['client_ms']:>9.2f} {stats['server_ms']:>9.2f} {stats['requests']:>8} "
        f"{images - stats['success']:>6}",
        flush=True,
    )
    return stats


def row_specs(args: argparse.Namespace) -> list[tuple[str, int, int, dict[str, str]]]:
    """Rows (a)-(e): name, runs at once, images per run, the limits each run takes."""
    n, c = args.n, args.concurrency
    limit = {"concurrency-limit": "fireworks-api"}
    rate_n = args.rate_n or max(50, round(args.rpm / 60 * 15))
    return [
        ("(a) no shared limit", 1, n, {}),
        (f"(b) concurrency_limit ({c} slots)", 1, n, limit),
        ("(c) two runs sharing it", 2, n, limit),
        ("(d) rate_limit, not binding", 1, n, {"rate-limit": "fireworks-rpm-free"}),
        (
            f"(e) two runs sharing rate_limit {args.rpm:g}/min",
            2,
            rate_n,
            {"rate-limit": "fireworks-rpm"},
        ),
    ]


def orchestrate(args: argparse.Namespace) -> int:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"bench_shared_limit: {started}; {git_state()}")
    print(f"load at start: {uptime_text()}")
    print(
        f"N={args.n} per run, stand-in latency {args.latency} s, {args.concurrency} in flight "
        f"per run, rate row at {args.rpm:g}/min"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-shared-limit-"))
    procs = Processes(workdir)
    rows: list[dict[str, Any]] = []
    c = args.concurrency
    try:
        with standin_services(procs, workdir, latency=args.latency, s3=False) as svc:
            conc = gcl_create(svc.env, "fireworks-api", args.concurrency)
            # (d): far above what one process reaches, so only the cost of taking shows.
            free_rate = gcl_create(svc.env, "fireworks-rpm-free", 1000, 2000.0)
            # (e): burst + 60 x decay = the account's RPM, the README's rule.
            burst = max(1, round(args.rpm / 20))
            decay = (args.rpm - burst) / 60
            bound_rate = gcl_create(svc.env, "fireworks-rpm", burst, decay)
            print(f"limits: `{conc}`; `{free_rate}`; `{bound_rate}`")
            header = f"  {'row':<52} {'images':>6} {'wall s':>7} {'img/s':>7}"
            print(f"{header} {'client ms':>9} {'server ms':>9} {'requests':>8} {'failed':>6}")
            print("  " + "-" * 104)
            for name, runs, n, limits in row_specs(args):
                rows.append(
                    row(procs, svc, workdir, name, runs=runs, n=n, concurrency=c, limits=limits)
                )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load at end: {uptime_text()}")
    a, b, cc, d, e = rows
    figures = {
        "n": args.n,
        "none_img_s": a["img_s"],
        "conc_img_s": b["img_s"],
        "conc_vs_none": b["img_s"] / a["img_s"],
        "conc_server_ms": b["server_ms"],
        "conc_client_ms": b["client_ms"],
        "none_client_ms": a["client_ms"],
        "none_server_ms": a["server_ms"],
        "shared_img_s": cc["img_s"],
        "shared_server_ms": cc["server_ms"],
        "rate_free_img_s": d["img_s"],
        "rate_free_vs_none": d["img_s"] / a["img_s"],
        "rate_free_server_ms": d["server_ms"],
        "rate_bound_rpm": 60 * e["images"] / e["wall_s"],
        "rate_bound_vs_limit": 60 * e["images"] / e["wall_s"] / args.rpm,
        "rate_bound_server_ms": e["server_ms"],
        "failed": sum(r["images"] - r["success"] for r in rows),
    }
    print(
        "RESULT "
        + " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
        )
    )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images per run")
    parser.add_argument("--latency", type=float, default=0.05, help="stand-in seconds per image")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rpm", type=float, default=6000.0, help="row (e)'s shared rate limit")
    parser.add_argument("--rate-n", type=int, default=0, help="images per run in row (e)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_script(argv, {"_run": run_child}, lambda args: orchestrate(parse_args(args)))


if __name__ == "__main__":
    sys.exit(main())
