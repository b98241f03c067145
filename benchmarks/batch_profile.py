"""bench_batch.py --profile: where the flux-flows child's CPU goes, from py-spy's stacks."""

from __future__ import annotations

from pathlib import Path

# Where a sample of the flux-flows run is charged: the first rule whose marker appears in the
# stack wins, so nested work (an S3 put inside a thumbnail) is charged to the outer step.
PROFILE_BUCKETS: tuple[tuple[str, str], ...] = (
    ("thumbnail: make + S3 put", "store_thumbnail (flux_flows/rendering/thumbnails.py"),
    ("S3 put of the image (boto3)", "S3Storage.put (flux_flows/storage/s3.py"),
    ("API call: httpx + response parsing", "FluxClient.generate (flux_flows/client/_sync.py"),
    ("render(): other library code", "flux_flows/rendering/one_image.py"),
    ("logging (log records, handlers)", "Logger._log (logging/__init__.py"),
    ("Prefect task engine (per-task overhead)", "prefect/task_engine.py"),
    ("manifest, records, artifacts", "flux_flows/records/reports.py"),
)
# py-spy's idle detection does not see threads blocked in C calls (socket reads, lock and
# condition waits), so a sample whose innermost Python frame is one of these waits is dropped.
# Checked against the process CPU time: what is left matches it within ~10%.
IDLE_LEAVES = frozenset(
    {
        "SyncStream.read",
        "SocketIO.readinto",
        "poll_wait_for_socket.<locals>.do_poll",
        "EpollSelector.select",
        "Condition.wait",
        "Event.wait",
        "Queue.get",
        "_worker",
        "Thread._wait_for_tstate_lock",
        "Handler.acquire",
        "ThreadLock.__enter__",
        "Popen._wait",
        "_send_heartbeats.<locals>.heartbeat_loop",
        "_sampling_profiler",
    }
)


def _frame_key(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (path/to/file.py)`: lines of one function merge."""
    head, _, tail = frame.rpartition(":")
    return head + ")" if tail.endswith(")") and tail[:-1].isdigit() else frame


def _sample_weights(
    samples: dict[str, int], thread_cpu_s: dict[str, float] | None, total_ms: float, n: int
) -> dict[str, float]:
    """ms of CPU per image that one sample of each thread family stands for.

    With the per-thread CPU times the child measured (/proc), each family's samples share that
    family's own CPU time: a thread that py-spy sees as busy while it only waits (for the GIL,
    for a core on a loaded machine, or in a C call such as a queue's get) then cannot claim
    another thread's CPU. Families that ended before the measurement (the render pool) share
    what no surviving thread accounts for. Without those times, every sample weighs the same.
    """
    all_samples = sum(samples.values())
    if not thread_cpu_s or not all_samples:
        return {group: total_ms / max(all_samples, 1) for group in samples}
    known = {g: thread_cpu_s[g] for g in samples if g in thread_cpu_s}
    rest_s = max(0.0, sum(thread_cpu_s.values()) - sum(known.values()))
    rest_samples = sum(c for g, c in samples.items() if g not in known)
    return {
        group: 1000
        * (known[group] if group in known else rest_s * count / rest_samples)
        / n
        / count
        for group, count in samples.items()
    }


def _read_stacks(path: Path) -> tuple[list[tuple[str, list[str], int]], dict[str, int]]:
    """py-spy's collapsed stacks, wait frames dropped: (thread family, frames, samples) each,
    and the busy samples by thread family."""
    stacks: list[tuple[str, list[str], int]] = []
    samples: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].rpartition(" (")[0].strip() in IDLE_LEAVES:
            continue
        group = (frames[0].partition(": ")[2] or frames[0]).rstrip("0123456789_-")
        stacks.append((group, frames, int(count_text)))
        samples[group] = samples.get(group, 0) + int(count_text)
    return stacks, samples


def _heaviest(inclusive: dict[str, float]) -> list[tuple[str, float]]:
    """Functions by inclusive CPU, heaviest first, without the thread and event-loop plumbing."""
    boring = ("threading.py", "concurrent/futures/thread.py", "<module>", "asyncio/")
    return [
        kv
        for kv in sorted(inclusive.items(), key=lambda kv: -kv[1])
        if not any(b in kv[0] for b in boring)
    ]


def summarize_profile(
    path: Path,
    n: int,
    cpu_ms_per_image: float,
    top: int = 25,
    thread_cpu_s: dict[str, float] | None = None,
) -> list[str]:
    """Per-image CPU by step and the heaviest functions, from py-spy's collapsed stacks.

    Sample counts say where a thread spends its time; how much CPU that is comes from the
    child's own per-thread CPU times (see `_sample_weights`), because on an oversubscribed
    machine a thread that is runnable but waiting for a core, or blocked in a C call, is still
    sampled as busy.
    """
    stacks, samples = _read_stacks(path)
    weight = _sample_weights(samples, thread_cpu_s, cpu_ms_per_image, n)

    buckets: dict[str, float] = {}
    threads: dict[str, float] = {}
    inclusive: dict[str, float] = {}
    for group, frames, count in stacks:
        ms_here = weight[group] * count
        threads[group] = threads.get(group, 0.0) + ms_here
        stack = ";".join(frames)
        bucket = next((name for name, mark in PROFILE_BUCKETS if mark in stack), None)
        if bucket is None:
            bucket = (
                "flow orchestration (main thread)"
                if group.startswith("MainThread")
                else f"other threads ({group})"
            )
        buckets[bucket] = buckets.get(bucket, 0.0) + ms_here
        for key in {_frame_key(f) for f in frames[1:]}:
            inclusive[key] = inclusive.get(key, 0.0) + ms_here
    total_ms = sum(threads.values())

    def ms(value: float) -> str:
        return f"{value:7.2f} ms/img {100 * value / max(total_ms, 1e-9):5.1f}%"

    how = (
        "each thread's samples weighted by its own CPU time"
        if thread_cpu_s
        else f"shares of the measured {cpu_ms_per_image:.1f} ms CPU per image"
    )
    lines = [
        f"py-spy: {sum(samples.values())} busy samples over N={n} (wait frames dropped); {how}"
    ]
    lines += ["  by step:"] + [
        f"    {ms(v)}  {name}" for name, v in sorted(buckets.items(), key=lambda kv: -kv[1])
    ]
    lines += ["  by thread:"] + [
        f"    {ms(v)}  {name}" for name, v in sorted(threads.items(), key=lambda kv: -kv[1])
    ]
    ranked = _heaviest(inclusive)
    lines += ["  heaviest functions (inclusive):"] + [
        f"    {ms(v)}  {name}" for name, v in ranked[:top]
    ]
    return lines
