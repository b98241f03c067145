"""What a batch's Prefect event and manifest asset cost (issue 26), and how soon the event follows
the manifest, with events on and off side by side in one run.

One measuring child (one process, so both settings share its imports and warm-up) runs a batch
of N images into a fresh local folder per run, against the library's emulator and a `prefect
server start` (both from `harness`, own processes on loopback). It first does one 2-image warm-up
run with events on and one with them off, then `--rounds` rounds of one run each way, the order
alternating (on, off / off, on), every run with distinct prompts so each generates N images.
For every run: wall time and client CPU (`harness.timing.timed`, the child's process tree),
and the Prefect server's tree CPU over the run (`harness.cpu.tree_cpu_s`).

With events on, the lag is the event's `occurred` (set by `emit_event` in the flow run) minus
the stored `manifest.jsonl`'s mtime, and the delivery is the server's `received` minus
`occurred`, read back from the server (`POST /events/filter`) by flow-run id, polled to a deadline.

    python benchmarks/bench_events.py                   # N=200, 0.5 s, 16 in flight, 5 rounds
    python benchmarks/bench_events.py --n 50 --rounds 2 # quick

The last line is machine-readable: RESULT key=value ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.cpu import tree_cpu_s
from harness.procs import Processes, child_parser, run_script
from harness.report import print_result, spread, stamp, uptime_text
from harness.services import emulator_services
from harness.timing import timed
from harness.workload import workload

EVENT_WAIT_S = 60.0
CHILD_TIMEOUT_S = 1800.0


def _child_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = child_parser("bench_events.py _runs")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    return parser.parse_args(argv)


def _one_run(args: argparse.Namespace, events: bool, name: str, n: int) -> dict[str, Any]:
    from flux_flows.flows import generate_images

    dest = Path(args.dest) / name
    server0 = tree_cpu_s(args.server_pid)
    with timed() as t:
        report = generate_images(
            workload(n, tag=f"{name} "), str(dest), max_concurrency=args.concurrency, events=events
        )
    manifest = dest / "manifest.jsonl"
    return {
        "name": name,
        "events": events,
        "wall_s": t.wall_s,
        "cpu_s": t.cpu_s,
        "server_cpu_s": tree_cpu_s(args.server_pid) - server0,
        "success": report.counts.get("SUCCESS", 0),
        "flow_run_id": report.flow_run_id,
        "manifest_mtime": manifest.stat().st_mtime if manifest.exists() else None,
    }


def run_child(argv: Sequence[str]) -> None:
    """Warm-up each way, then the alternating rounds; the figures go to the result file."""
    import logging

    logging.getLogger("botocore").setLevel(logging.WARNING)
    args = _child_args(argv)
    for events in (True, False):
        _one_run(args, events, f"warm-up-{'on' if events else 'off'}", 2)
    runs = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for events in order:
            runs.append(_one_run(args, events, f"r{r}-{'on' if events else 'off'}", args.n))
    Path(args.result_file).write_text(json.dumps({"runs": runs}))


def _server_events(api_url: str) -> dict[str, dict[str, Any]]:
    """The batch events the server holds, by the flow run they name."""
    import httpx

    body = {"filter": {"event": {"prefix": ["flux-flows.batch."]}}, "limit": 50}
    answer = httpx.post(f"{api_url}/events/filter", json=body, timeout=10.0)
    answer.raise_for_status()
    found = {}
    for event in answer.json()["events"]:
        found[event["resource"]["prefect.resource.id"].rsplit(".", 1)[1]] = event
    return found


def attach_events(api_url: str, runs: list[dict[str, Any]]) -> None:
    """Each events-on run's lag and delivery; fails if an event is missing at the deadline, or
    if an events-off run sent one."""
    wanted = {r["flow_run_id"] for r in runs if r["events"]}
    deadline = time.monotonic() + EVENT_WAIT_S
    while not wanted <= set(found := _server_events(api_url)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"events missing at the server: {sorted(wanted - set(found))}")
        time.sleep(0.2)  # polling the server for stored events, to a deadline
    for run in runs:
        event = found.get(run["flow_run_id"])
        if not run["events"]:
            assert event is None, f"{run['name']} ran with events off but sent {event}"
            continue
        occurred = datetime.fromisoformat(event["occurred"]).timestamp()
        received = datetime.fromisoformat(event["received"]).timestamp()
        run["lag_s"] = occurred - run["manifest_mtime"]
        run["delivery_s"] = received - occurred


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    print(f"  {'run':12} {'wall s':>8} {'client cpu s':>12} {'server cpu s':>12} {'lag s':>7}")
    for run in runs:
        lag = f"{run['lag_s']:7.3f}" if "lag_s" in run else f"{'-':>7}"
        print(
            f"  {run['name']:12} {run['wall_s']:8.2f} {run['cpu_s']:12.2f} "
            f"{run['server_cpu_s']:12.2f} {lag}"
        )
    on = [r for r in runs if r["events"]]
    off = [r for r in runs if not r["events"]]

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return float(spread([r[key] for r in rows])[0])

    # Each round's on/off ratio, so a round that ran while the machine was busy stays paired.
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(on, off, strict=True)]
    print_result(
        {
            "n": args.n,
            "rounds": args.rounds,
            "on_wall_s": med(on, "wall_s"),
            "off_wall_s": med(off, "wall_s"),
            "wall_on_vs_off_pct": 100 * (float(spread(ratios)[0]) - 1),
            "on_cpu_s": med(on, "cpu_s"),
            "off_cpu_s": med(off, "cpu_s"),
            "on_server_cpu_s": med(on, "server_cpu_s"),
            "off_server_cpu_s": med(off, "server_cpu_s"),
            "lag_median_s": med(on, "lag_s"),
            "lag_max_s": max(r["lag_s"] for r in on),
            "delivery_median_s": med(on, "delivery_s"),
            "failed": sum(args.n - r["success"] for r in runs),
        }
    )


def orchestrate(args: argparse.Namespace) -> int:
    print(f"bench_events: {stamp()}")
    print(f"load at start: {uptime_text()}")
    print(
        f"N={args.n} per run, emulator latency {args.latency} s, {args.concurrency} in flight, "
        f"{args.rounds} rounds (events on/off, order alternating), local folder destinations"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-events-"))
    procs = Processes(workdir)
    try:
        with emulator_services(procs, workdir, latency=args.latency, image_kb=None, rpm=None) as s:
            result = workdir / "runs.json"
            command = [sys.executable, __file__, "_runs", "--n", str(args.n)]
            command += ["--concurrency", str(args.concurrency), "--dest", str(workdir / "out")]
            command += ["--result-file", str(result), "--rounds", str(args.rounds)]
            command += ["--server-pid", str(s.pids["prefect server"])]
            runs = procs.run_json("runs", command, s.env, result, CHILD_TIMEOUT_S)["runs"]
            attach_events(s.prefect_api, runs)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load at end: {uptime_text()}")
    report(args, runs)
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="images per run")
    parser.add_argument("--latency", type=float, default=0.5, help="emulator seconds per image")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_script(argv, {"_runs": run_child}, lambda a: orchestrate(parse_args(a)))


if __name__ == "__main__":
    sys.exit(main())
