"""A failed per-image task run logs one line, not "NoneType: None"; importing changes no logger.

Prefect logs a task that returns a Failed state with `exc_info` set but no exception. The filter
that drops the empty traceback is installed by the first failure, not at import (issue 23: no
global side effects on import).
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from flux_flows.errors import ServerError
from flux_flows.rendering import one_image


def test_importing_the_render_module_installs_no_filter() -> None:
    code = (
        "import logging, flux_flows.rendering.one_image\n"
        "print(len(logging.getLogger('prefect.task_runs').filters))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_a_failed_image_installs_the_filter_once_and_it_drops_empty_tracebacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(job: object) -> object:
        raise ServerError("503 after 4 attempts", attempts=4)

    monkeypatch.setattr(one_image, "render", fail)
    job = type("Job", (), {"cache_key": "k" * 64})()
    logger = logging.getLogger("prefect.task_runs")
    for _ in range(3):
        state = one_image.render_image.fn(job)  # type: ignore[arg-type]  # only cache_key is read
        assert state.is_failed() and state.data.api_calls == 4
    assert logger.filters.count(one_image._NO_EMPTY_TRACEBACK) == 1
    record = logging.LogRecord(
        "prefect.task_runs", logging.ERROR, "", 0, "x", None, (None, None, None)
    )
    assert one_image._NO_EMPTY_TRACEBACK.filter(record) and record.exc_info is None
    logger.removeFilter(one_image._NO_EMPTY_TRACEBACK)
