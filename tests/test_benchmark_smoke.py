"""The batch benchmark still runs end to end, so the figures in RESULTS.md can be reproduced.

It runs the real script (its own emulator, moto and Prefect server processes) at a tiny N with
a short latency: this checks the plumbing and the RESULT line, not the performance.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_batch.py"
EXPECTED = (
    "n",
    "flow_vs_ideal",
    "flow_vs_raw",
    "speedup_vs_seed",
    "cached_rerun_ratio",
    "cpu_ms_per_image",
    "cpu_vs_raw",
    "rss_kb_per_image",
    "image_kb",
    "standin_images_per_s",
    "standin_cpu_ms_per_image",
)


def parse_result(line: str) -> dict[str, float]:
    assert line.startswith("RESULT "), line
    pairs = dict(item.split("=", 1) for item in line.split()[1:])
    return {key: float(value) for key, value in pairs.items()}


def test_benchmark_runs_and_prints_a_parsable_result(tmp_path: Path) -> None:
    # With --rpm, so that the rate-limit path (pacing, the emulator's request log) runs too; at
    # 1200/min it paces 6 images by 0.05 s and does not slow the test down.
    command = [sys.executable, str(SCRIPT), "--n", "6", "--latency", "0.05"]
    command += ["--concurrency", "3", "--image-kb", "20", "--seed-sample", "2"]
    command += ["--rss-small", "2", "--rpm", "1200"]
    # Generous timeout: other suites share this machine; the run itself takes ~30 s.
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = parse_result(lines[-1])
    assert set(EXPECTED) <= set(result), result
    assert result["n"] == 6
    for key in EXPECTED:
        assert math.isfinite(result[key]), (key, lines[-1])
    assert result["flow_vs_raw"] > 0 and result["cpu_ms_per_image"] > 0
    assert result["image_kb"] > 0
    assert result["cpu_vs_raw"] > 0 and result["standin_images_per_s"] > 0
    assert result["cpu_vs_raw_no_thumbnails"] > 0 and result["flow_vs_raw_no_thumbnails"] > 0
    assert "flux-flows, thumbnails=False" in done.stdout
    # The stand-in run (2 x N images by default) answered every generation and failed none.
    assert "the stand-in answered 14 generations" in done.stdout  # 12 + the 2-image warm-up
    assert "failed 0, client CPU" in done.stdout
    assert result["rpm"] == 1200 and result["failed"] == 0
    assert 0 < result["sustained_rate_pct"] <= 110
    # The cached re-run must not have called the API or uploaded again.
    assert "cached re-run: API calls 0, cache hits 6, requests seen by the emulator 0" in (
        done.stdout
    )
