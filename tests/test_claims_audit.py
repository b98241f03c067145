"""The docs' promises point at tests, their figures at committed raw outputs (issue 25).

README.md, RELIABILITY.md, benchmarks/RESULTS.md and docs/claims.md cite tests by name and
figures by the run that produced them. Both drift silently when a test is renamed or a figure
is retyped, so these checks read the docs and fail on a cited test that does not exist, a raw
file that is not committed, a RESULT line its raw files do not hold, or a README figure that
differs from the raw output it cites. The last tests cover README promises no other test held
to their exact words (exit 6; a chunked batch with no Prefect API only warns).
"""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
RAW = REPO / "benchmarks" / "raw"
DOCS = (
    "README.md",
    "RELIABILITY.md",
    "benchmarks/RESULTS.md",
    "docs/claims.md",
    "docs/architecture.md",
    "deployments/README.md",
)

# `tests/faults/test_x.py::test_y`, `test_x.py::test_y`, `::test_y` or a bare `test_y` (a name
# followed by `.py` is a file, not a test). The module is its path under tests/ without `.py`.
CITED_TEST = re.compile(r"(?:(?:tests/)?((?:\w+/)*test_\w+)\.py)?(?:::)?\b(test_\w+)\b(?!\.py)")
# `tests/test_x.py`, `tests/helpers/matrix.py` or a folder, `tests/faults` (not a glob such as
# `tests/test_fleet*.py`).
CITED_PATH = re.compile(r"\btests/([\w/]*\w(?:\.py)?)(?![\w*])")


def _defined_tests() -> dict[str, set[str]]:
    """Test functions per test module (its path under tests/, no `.py`), read from the source
    (nothing is imported), in every folder: tests/faults/ and tests/helpers/ too."""
    found: dict[str, set[str]] = {}
    for path in TESTS.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found[path.relative_to(TESTS).with_suffix("").as_posix()] = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
        }
    return found


def _doc(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_a_doc_cites_exists(doc: str) -> None:
    defined = _defined_tests()
    every = set().union(*defined.values())
    stems = {module.rpartition("/")[2] for module in defined}
    missing = []
    for module, name in CITED_TEST.findall(_doc(doc)):
        if module and name not in defined.get(module, set()):
            missing.append(f"{module}.py::{name}")
        elif not module and name not in every and name not in stems:
            missing.append(name)
    assert not missing, f"{doc} cites tests that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_file_a_doc_names_exists(doc: str) -> None:
    cited = CITED_PATH.findall(_doc(doc))
    missing = {name for name in cited if not (TESTS / name).exists()}
    assert not missing, f"{doc} names test files or folders that do not exist: {sorted(missing)}"


def test_every_raw_output_the_docs_link_is_committed() -> None:
    cited = set(re.findall(r"\braw/([\w.-]+\.txt)", _doc("benchmarks/RESULTS.md")))
    for doc in ("README.md", "RELIABILITY.md", "docs/claims.md"):
        cited |= set(re.findall(r"benchmarks/raw/([\w.-]+\.txt)", _doc(doc)))
    assert cited, "RESULTS.md links no raw output: the pattern no longer matches"
    missing = sorted(name for name in cited if not (RAW / name).is_file())
    assert not missing, f"linked raw outputs that are not in benchmarks/raw/: {missing}"


def _current_results() -> str:
    """RESULTS.md up to its historical sections: the part that claims raw output is kept."""
    text = _doc("benchmarks/RESULTS.md")
    head, marker, _ = text.partition("\n## Historical figures")
    assert marker, "RESULTS.md no longer has its 'Historical figures' heading"
    return head


def test_result_lines_of_the_current_figures_are_in_their_raw_outputs() -> None:
    raw_lines = {
        line.strip() for path in RAW.glob("*.txt") for line in path.read_text().splitlines()
    }
    pasted = [
        line.strip()
        for line in _current_results().splitlines()
        if line.startswith(("RESULT ", "RANGE "))
    ]
    assert len(pasted) >= 8, "fewer RESULT lines than RESULTS.md's current sections hold"
    not_raw = [line[:120] for line in pasted if line not in raw_lines]
    assert not not_raw, f"RESULT lines no raw output holds (retyped or shortened?): {not_raw}"


def _fenced_blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            if inside:
                blocks.append([])
        elif inside:
            blocks[-1].append(line)
    return blocks


def test_the_current_code_blocks_are_pasted_from_raw_outputs() -> None:
    """Every line of every fenced block in the current sections is in some raw output."""
    raw_text = "\n".join(path.read_text() for path in RAW.glob("*.txt"))
    raw_lines = {line.strip() for line in raw_text.splitlines()}
    blocks = _fenced_blocks(_current_results())
    assert len(blocks) >= 6, "fewer code blocks than RESULTS.md's current sections hold"
    typed = [
        line.strip()[:100]
        for block in blocks
        for line in block
        if line.strip() and line.strip() not in raw_lines
    ]
    assert not typed, f"lines of RESULTS.md's current blocks that no raw output holds: {typed}"


def _number(text: str, pattern: str, where: str) -> str:
    found = re.search(pattern, text, flags=re.S)
    assert found, f"{where}: no match for {pattern!r} (reworded? update this check with it)"
    return found.group(1)


def _same(doc_figure: str, raw_figure: str, scale: float = 1.0) -> bool:
    """The doc's figure is the raw one rounded to the doc's own precision."""
    decimals = len(doc_figure.partition(".")[2])
    half_unit = 0.5 * 10**-decimals + 1e-9
    return abs(float(doc_figure) - float(raw_figure) * scale) <= half_unit


FIRST_RUN = "2026-12-05-bench_first_run-971a07d.txt"
FIRST_RUN_EARLIER = "2026-12-05-bench_first_run.txt"
README_FIGURES: list[tuple[str, str, str, float]] = [
    # (README pattern, raw file, raw pattern, factor from the raw unit to the README's)
    (r"first `demo` succeeded (\d+) of 10", FIRST_RUN, r"first_demo_ok=(\d+)/10", 1),
    (r"of 10 in ([\d.]+) s at most", FIRST_RUN, r"first_demo_max_s=([\d.]+)", 1),
    (r"at most \(median ([\d.]+) s, server", FIRST_RUN, r"\nfirst demo +([\d.]+) s", 1),
    (r"second took ([\d.]+) s at most", FIRST_RUN, r"second_demo_max_s=([\d.]+)", 1),
    (r"second took [\d.]+ s at most \(median ([\d.]+)", FIRST_RUN, r"\nsecond demo +([\d.]+)", 1),
    (r"stored prompt ([\d.]+) s at most", FIRST_RUN, r"cached_run_max_s=([\d.]+)", 1),
    (r"stored prompt [\d.]+ s at most \(median ([\d.]+)", FIRST_RUN, r"\ncached run +([\d.]+)", 1),
    (r"`flux-flows --help` ([\d.]+) s at most", FIRST_RUN, r"help_max_s=([\d.]+)", 1),
    (r"took up to ([\d.]+) s\s+at 099194e", FIRST_RUN_EARLIER, r"first_demo_max_s=([\d.]+)", 1),
    (r"and ([\d.]+) s\s+at 971a07d", FIRST_RUN, r"first_demo_max_s=([\d.]+)", 1),
    (r"([\d.]+)x the images/s", "2026-12-05-bench_shared_limit.txt", r"conc_vs_none=([\d.]+)", 1),
    (
        r"([\d.]+) ms of Prefect-server CPU per image",
        "2026-12-05-bench_shared_limit.txt",
        r"conc_server_ms=([\d.]+)",
        1,
    ),
    (r"\(not a\s+model: ([\d.]+) KB", "2026-12-05-bench_sizes.txt", r"planned_image_b=(\d+)", 1e-3),
    (r"KB against ([\d.]+) KB", "2026-12-05-bench_sizes.txt", r"request_model_b=(\d+)", 1e-3),
    (
        r"([\d.]+) KB of RSS per extra",
        "2026-12-05-bench_scale-memory.txt",
        r"rss_kb_per_image=(\S+)",
        1,
    ),
    (r"process in ([\d.]+) MB", "2026-12-05-bench_scale-memory.txt", r"large_peak_rss_mb=(\S+)", 1),
    (r"`plan` in\s+([\d.]+) MB", "2026-12-05-bench_scale-memory.txt", r"plan_peak_rss_mb=(\S+)", 1),
    (
        r"per image \(([\d.]+) ms, the median",
        "2026-12-05-bench_batch.txt",
        r"RESULT repeat=3 .*?thumbnail_cpu_ms_per_image=(\S+)",
        1,
    ),
    (
        r"against ([\d.]+) ms for the rest",
        "2026-12-05-bench_batch.txt",
        r"thumbnails=False +\S+ \[\S+\] +([\d.]+) ",
        1,
    ),
]


@pytest.mark.parametrize(("doc_pattern", "raw_file", "raw_pattern", "scale"), README_FIGURES)
def test_readme_figures_are_those_of_the_raw_output_they_cite(
    doc_pattern: str, raw_file: str, raw_pattern: str, scale: float
) -> None:
    readme = _doc("README.md")
    figure = _number(readme, doc_pattern, "README.md")
    raw = _number((RAW / raw_file).read_text(), raw_pattern, raw_file)
    assert _same(figure, raw, scale), f"README says {figure}, {raw_file} says {raw} ({scale}x)"


def _modules_named_in(sentence: str) -> set[str]:
    """`cli/batch.py`, `flux_flows/cli/batch.py` or `cli.batch`, as a path under flux_flows/."""
    named = set()
    for token in re.findall(r"`([\w./]+)`", sentence):
        token = token.removeprefix("flux_flows/").removeprefix("flux_flows.")
        if token.endswith(".py"):
            named.add(token)
        elif re.fullmatch(r"\w+(?:\.\w+)+", token):
            named.add(token.replace(".", "/") + ".py")
    return named


def _readme_over_450() -> set[str]:
    """What README's sentence about the 450-line aim says is over it: "No module is over 450
    lines" (none), or the modules it names in that sentence. The generated module map between
    its markers is not prose: a docstring there cannot answer for the README."""
    readme = re.sub(
        r"<!-- module-map:begin -->.*?<!-- module-map:end -->", "", _doc("README.md"), flags=re.S
    )
    sentences = [
        " ".join(part.split())
        for part in re.split(r"(?<=[.!?])\s+|\n\s*\n", readme)
        if "450 lines" in " ".join(part.split())
    ]
    assert sentences, "README no longer says anything about modules over 450 lines"
    claimed: set[str] = set()
    for sentence in sentences:
        names = _modules_named_in(sentence)
        none = re.search(r"\bno module (?:is )?over 450 lines\b", sentence, flags=re.I)
        assert names or none, f"README's 450-line sentence names no module: {sentence!r}"
        claimed |= names
    return claimed


def test_the_modules_over_450_lines_are_those_the_readme_names() -> None:
    claimed = _readme_over_450()
    long = {
        path.relative_to(REPO / "flux_flows").as_posix()
        for path in (REPO / "flux_flows").rglob("*.py")
        if len(path.read_text(encoding="utf-8").splitlines()) > 450
    }
    assert long == claimed, f"over 450 lines: {sorted(long)}; README names {sorted(claimed)}"


# README's module map is generated by docs/module_map.py and held to the code by
# tests/test_architecture.py (every module once, in its layer, with its real imports).


# --------------------------------------------------------------------------------------------
# README promises no other test held to their exact words
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["claims folder is a file", "bucket missing"])
def test_exit_6_when_the_destination_or_its_claims_folder_cannot_be_written(
    case: str, tmp_path: Path, s3_server: str, cli_env: dict[str, str], flow_env: Any
) -> None:
    """README: '6 the destination or its `claims/` folder cannot be read or written' (the fleet
    test of the claims case accepts any non-zero code)."""
    import os

    out = tmp_path / "out"
    if case == "bucket missing":
        destination = "s3://no-such-bucket-for-flux-flows/x/"
    else:
        out.mkdir()
        (out / "claims").write_text("a file where the claims folder should be\n")
        destination = str(out)
    env = {**cli_env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    done = subprocess.run(
        [sys.executable, "-m", "flux_flows.cli", "run", "--to", destination, "-p", "a crane"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert done.returncode == 6, done.stderr[-2000:]
    assert flow_env.stats.requests == 0
    assert "Traceback" not in done.stderr


def test_a_chunked_batch_with_no_prefect_api_warns_and_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: without PREFECT_API_URL 'each worker process starts a temporary Prefect server of
    its own, and the batch warns'. It only warns (a known gap: RELIABILITY.md)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flux_flows.rendering import dispatch

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("test-claims-audit")
    logger.addHandler(handler)
    monkeypatch.setattr(dispatch, "get_run_logger", lambda: logger)
    try:
        with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
            dispatch._warn_without_a_shared_api()
        assert not records  # an API is configured: nothing to say
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            dispatch._warn_without_a_shared_api()  # returns: a warning, not a refusal
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert record.levelno == logging.WARNING
    assert "PREFECT_API_URL" in record.getMessage()
    assert "flux-flows server env" in record.getMessage()


def test_a_retry_after_on_a_503_is_ignored_and_a_429s_is_honoured() -> None:
    """RELIABILITY.md, "Worth knowing": 'A `Retry-After` on a 503 is ignored (only 429s honour
    it); 5xx use exponential backoff.'"""
    import io

    import httpx
    from PIL import Image

    from flux_flows.client import FluxClient, RetryPolicy
    from flux_flows.models import ImageRequest

    picture = io.BytesIO()
    Image.new("RGB", (16, 8), "red").save(picture, format="JPEG")
    image = httpx.Response(200, headers={"content-type": "image/jpeg"}, content=picture.getvalue())
    policy = RetryPolicy(max_retries=1, initial_delay_s=0.01, max_delay_s=0.01)

    def delays_after(status: int) -> list[float]:
        answers = [httpx.Response(status, headers={"retry-after": "1"}, json={"error": "busy"})]
        delays: list[float] = []

        def api(request: httpx.Request) -> httpx.Response:
            return answers.pop() if answers else image

        transport = httpx.MockTransport(api)
        base = "https://api.test/inference/v1"
        with FluxClient("k", base_url=base, retry=policy, transport=transport) as client:
            client.on_retry = lambda attempt, delay, kind: delays.append(delay)
            assert client.generate(ImageRequest(prompt="x", seed=7)).attempts == 2
        return delays

    (backoff,) = delays_after(503)
    assert 0 < backoff <= 0.01  # the policy's (jittered) backoff, not the server's 1 s
    assert delays_after(429) == [1.0]


def test_a_server_that_does_not_start_in_time_names_its_log(
    tmp_path: Path, fireworks_env: Any
) -> None:
    """README, Troubleshooting: the CLI 'waits up to 180 s (`FLUX_FLOWS_SERVER_TIMEOUT`), and on
    failure names the server's log (`$PREFECT_HOME/flux-flows-server.log`)'."""
    import os

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        FIREWORKS_API_KEY="unused",
        FIREWORKS_BASE_URL=fireworks_env.base_url,
        FLUX_FLOWS_SPILL_DIR=str(home / "spill"),
        COLUMNS="200",
    )

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "flux_flows.cli", *args]
        return subprocess.run(
            argv, capture_output=True, text=True, env={**env, **extra}, timeout=300
        )

    try:
        done = cli(
            "run", "-p", "a fox", "--to", str(tmp_path / "out"), FLUX_FLOWS_SERVER_TIMEOUT="0.01"
        )
    finally:
        stopped = cli("server", "stop")  # the server it started goes on starting: stop it
    said = "".join(done.stderr.split())
    assert done.returncode == 4, done.stderr[-2000:]
    assert str(home / "flux-flows-server.log") in said, done.stderr[-2000:]
    assert "FLUX_FLOWS_SERVER_TIMEOUT" in said and "Traceback" not in done.stderr
    assert fireworks_env.stats.requests == 0
    assert stopped.returncode == 0, stopped.stderr[-2000:]
