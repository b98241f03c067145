"""The fault matrix, the machine dies: a batch process SIGKILLed half-way (plain threads, or a
Dask cluster of worker processes), then a re-run in a fresh process."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.kills import BATCH_SCRIPT, CHUNKED_BATCH_SCRIPT, kill_mid_batch, rerun_and_record
from helpers.matrix import Scenario, distinct

pytestmark = pytest.mark.usefixtures("flow_env")


def test_sigkill_mid_batch_then_rerun(
    scenario: Callable[..., Scenario], s3_bucket: str, tmp_path: Path
) -> None:
    n, concurrency = 40, 4
    sc = scenario(
        f"process SIGKILLed mid-batch ({n} images, max_concurrency {concurrency})",
        f"s3://{s3_bucket}/killed",
    )
    prompts = distinct("killed batch", n)
    # ~4 s of API time: room to catch the run halfway even on a loaded machine.
    sc.emulator.configure(latency_s=0.4)
    out = tmp_path / "killed.json"
    argv = [sys.executable, "-c", BATCH_SCRIPT, json.dumps(prompts), sc.destination, str(out)]
    left = kill_mid_batch(sc, [*argv, str(concurrency)], tmp_path, at_least=n // 2, group=False)
    assert n // 2 <= len(left.stored) < n

    after = rerun_and_record(
        sc,
        prompts,
        tmp_path,
        left,
        in_flight_bound=concurrency,
        describe=lambda after: (
            f"SIGKILL once {len(left.stored)} were stored; the re-run in a new process finds "
            f"them ({after.report.cache_hits} cache hits) and generates only the other "
            f"{after.report.api_calls}, each once"
        ),
    )
    assert set(after.rerun.values()) == {1}  # half the batch was left: the re-run made each once


def test_sigkill_mid_batch_in_chunked_mode_then_rerun(
    scenario: Callable[..., Scenario], s3_bucket: str, tmp_path: Path
) -> None:
    """The batch runs its chunks on a Dask LocalCluster of 2 worker processes; the whole process
    group (the flow, the scheduler, the nannies, the workers) is SIGKILLed mid-batch."""
    pytest.importorskip("prefect_dask")
    n, concurrency, chunk_size = 40, 4, 5
    sc = scenario(
        f"process group SIGKILLed mid-batch in chunked mode (Dask, 2 worker processes, {n} "
        f"images in chunks of {chunk_size}, max_concurrency {concurrency})",
        f"s3://{s3_bucket}/chunked",
    )
    prompts = distinct("killed chunked batch", n)
    sc.emulator.configure(latency_s=0.4)  # ~4 s of API time: room to catch the run halfway
    script = tmp_path / "chunked_batch.py"
    script.write_text(CHUNKED_BATCH_SCRIPT, encoding="utf-8")
    argv = [sys.executable, str(script), json.dumps(prompts), sc.destination]
    left = kill_mid_batch(
        sc, [*argv, str(concurrency), str(chunk_size)], tmp_path, at_least=n // 2, group=True
    )
    # More than one process: the Dask workers ran the chunks, and all died together.
    assert left.processes >= 3, left.processes
    assert n // 2 <= len(left.stored) < n

    rerun_and_record(
        sc,
        prompts,
        tmp_path,
        left,
        in_flight_bound=concurrency,
        describe=lambda after: (
            f"SIGKILL of the group ({left.processes} processes) once {len(left.stored)} were "
            f"stored; the re-run in a new process finds them ({after.report.cache_hits} cache "
            f"hits) and generates only the other {after.report.api_calls}, each once"
        ),
    )
