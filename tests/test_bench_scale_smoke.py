"""The scale benchmark still runs end to end, so the figures in RESULTS.md can be reproduced.

It runs the real script (its own stand-in API, Prefect server and moto processes, a Dask
LocalCluster, a process work pool with 2 workers, a cached re-run and `flux-flows plan`) at a
tiny N: this checks the plumbing and the RESULT line, not the performance. Every row the RESULT
line reports must have run: the work pool's too (`workpool=ran`, its chunk runs completed).
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scale.py"
EXPECTED = (
    "n",
    "threads_img_s",
    "dask_img_s",
    "dask_vs_threads",
    "tasks_vs_threads",
    "threads_cpu_ms_per_image",
    "dask_cpu_ms_per_image",
    "server_ms_per_image",
    "rss_kb_per_image",
    "s3_dask_vs_threads",
    "large_peak_rss_mb",
    "large_rerun_api_calls",
    "plan_s",
    "plan_peak_rss_mb",
)

pytest.importorskip("distributed")
pytest.importorskip("prefect_dask")


def parse_result(line: str) -> dict[str, str]:
    assert line.startswith("RESULT "), line
    return dict(item.split("=", 1) for item in line.split()[1:])


def test_scale_benchmark_runs_and_prints_a_parsable_result(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--n", "12", "--latency", "0.01"]
    command += ["--concurrency", "4", "--rss-small", "4", "--tasks-n", "4", "--s3-n", "4"]
    command += ["--n-large", "8", "--plan-rows", "50"]
    # Generous timeout: other suites share this machine; the run itself takes ~60 s.
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = parse_result(lines[-1])
    assert set(EXPECTED) <= set(result), result
    assert result["n"] == "12"
    for key in EXPECTED:
        assert math.isfinite(float(result[key])), (key, lines[-1])
    assert float(result["dask_vs_threads"]) > 0 and float(result["threads_cpu_ms_per_image"]) > 0
    # The cached re-run of the large run made no API call (the report's and the stand-in's count).
    assert float(result["large_rerun_api_calls"]) == 0
    # Row (d), the work pool, runs here (no --pool-n 0): it must be measured, not explained away.
    pool_lines = [x for x in lines if "(d) work pool" in x]
    assert result["workpool"] == "ran", (
        "row (d) did not run; the benchmark said:\n" + "\n".join(pool_lines) + done.stderr[-2000:]
    )
    assert result["workpool_n"] == "12", result
    for key in ("workpool_img_s", "workpool_cpu_ms_per_image", "workpool_vs_threads"):
        assert math.isfinite(float(result[key])) and float(result[key]) > 0, (key, lines[-1])
    # Its chunks ran as flow runs of the chunk deployment on the pool's workers, all completed
    # (the warm-up's included), and the workers' logs account for every one of them.
    chunk_line = next(x for x in lines if x.strip().startswith("chunk runs "))
    states_text, _, workers_text = (
        chunk_line.strip().removeprefix("chunk runs ").partition(", per worker ")
    )
    states, per_worker = ast.literal_eval(states_text), ast.literal_eval(workers_text)
    assert set(states) == {"COMPLETED"} and states["COMPLETED"] >= 2, chunk_line
    assert sum(per_worker.values()) == states["COMPLETED"], chunk_line
    pool_counts = next(x for x in pool_lines if ": stand-in " in x)
    assert pool_counts.endswith("counts {'SUCCESS': 12}"), pool_counts
    table = done.stdout[done.stdout.index("contender") :]
    for label in ("(a) one process, threads", "(b) Dask", "(c) task run per image", "plan"):
        assert label in table
    # Every contender stored every image: no failures column other than 0.
    assert "failed" in table and " counts {'SUCCESS': 12}" in done.stdout
