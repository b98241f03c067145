"""What the emulator is told and what it counts: the API's paths and limits, `EmulatorConfig`
(the knobs a test or benchmark turns, checked when set) and `EmulatorStats` (what the server saw,
readable from any thread). Every other module of the package reads these, and this one imports
none of them, so it sits at the bottom of the package.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

GENERATION_PATH = "/inference/v1/workflows/accounts/fireworks/models/{model}/text_to_image"
KONTEXT_SUBMIT_PATH = "/inference/v1/workflows/accounts/fireworks/models/{model}"
KONTEXT_RESULT_PATH = "/inference/v1/workflows/accounts/fireworks/models/{model}/get_result"
RESULTS_PATH = "/_emulator/results/{name}"
# Every API route is metered: text_to_image, Kontext submit and get_result.
GENERATION_RE = re.compile(
    r"^/inference/v1/workflows/accounts/fireworks/models/[^/]+(/text_to_image|/get_result)?$"
)
API_PREFIX = "/inference/v1"
# `flux-flows emulator`'s port: clear of Dask (8786 scheduler, 8787 dashboard), Prefect (4200),
# moto (5000) and the usual dev servers (3000, 5173, 8000, 8080, 8888).
DEFAULT_PORT = 8737

DEFAULT_ASPECT_RATIO = "1:1"
DEFAULT_GUIDANCE = 3.5
DEFAULT_JPEG_QUALITY = 90
MAX_BODY_BYTES = 1024 * 1024
# A Kontext submit carries the input image as a data URI: allow ~20 MiB of image.
KONTEXT_MAX_BODY_BYTES = 32 * 1024 * 1024
KONTEXT_MAX_TASKS = 2048  # oldest tasks (and their results) are forgotten beyond this
KONTEXT_DEFAULT_SAFETY_TOLERANCE = 2
RATE_WINDOW_S = 60.0

Mode = Literal["jpeg", "png", "json"]


@dataclass
class EmulatorConfig:
    """Behaviour knobs. Mutable so a running emulator can be reconfigured between test phases."""

    api_key: str | None = field(default=None, repr=False)
    latency_s: float = 0.0
    jitter_s: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float | None = 1.0
    rate_5xx: float = 0.0
    status_5xx: int = 503
    rpm_limit: int | None = None
    # More requests than this in flight at once -> 429, as an account over its capacity answers;
    # unlike rate_429, backing off helps, which is what adaptive clients need to be tested against.
    max_concurrent: int | None = None
    filter_words: tuple[str, ...] = ("nsfw", "forbidden")
    image_kb: int | None = None
    fault_seed: int = 0
    # Kontext: how long a task stays Pending, and the origin its result URLs name (default: the
    # origin the client called, so results come from this server; another spelling of the same
    # address, e.g. http://localhost:PORT, lets tests see a result on a "foreign" host).
    kontext_pending_s: float = 0.3
    kontext_results_url: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.filter_words, str):
            self.filter_words = (self.filter_words,)
        self.filter_words = tuple(str(word) for word in self.filter_words)
        self.validate()

    def validate(self) -> None:
        """Fail at configuration time, not as a confusing answer in the middle of a run."""
        if self.api_key is not None and (
            not isinstance(self.api_key, str) or not self.api_key.strip()
        ):
            raise ValueError("api_key must be None (accept any key) or a non-empty string")
        for name in ("latency_s", "jitter_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("rate_429", "rate_5xx"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in 0..1")
        if self.rate_429 + self.rate_5xx > 1.0:
            raise ValueError("rate_429 + rate_5xx must not exceed 1")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError("retry_after_s must be None or >= 0")
        if not 500 <= self.status_5xx <= 599:
            raise ValueError("status_5xx must be in 500..599")
        if self.rpm_limit is not None and self.rpm_limit < 1:
            raise ValueError("rpm_limit must be None or >= 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError("max_concurrent must be None or >= 1")
        if self.image_kb is not None and self.image_kb < 1:
            raise ValueError("image_kb must be None or >= 1")
        if self.kontext_pending_s < 0:
            raise ValueError("kontext_pending_s must be >= 0")
        if self.kontext_results_url is not None and not str(self.kontext_results_url).startswith(
            ("http://", "https://")
        ):
            raise ValueError("kontext_results_url must be None or an http(s):// origin")

    def public_dict(self) -> dict[str, Any]:
        """The configuration as JSON-able data, with the key reduced to whether one is set."""
        data = dataclasses.asdict(self)
        data["api_key"] = None if self.api_key is None else "<set>"
        data["filter_words"] = list(self.filter_words)
        return data


def apply_changes(config: EmulatorConfig, changes: dict[str, Any]) -> None:
    """Validate the whole new configuration first, so a bad change leaves the old one intact."""
    known = {f.name for f in dataclasses.fields(EmulatorConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown emulator setting(s): {', '.join(unknown)}")
    candidate = dataclasses.replace(config, **changes)
    for name in changes:
        setattr(config, name, getattr(candidate, name))


@dataclass
class EmulatorStats:
    """What the server saw, readable from any thread while it runs.

    `generations` is what a user would be billed for: every answer that carried a generated image,
    including CONTENT_FILTERED ones and the `truncate`/`garbage`/`drop` faults (the provider did the
    work and billed it; only the delivery broke). Error statuses, `html` and `json-no-images`
    answers and requests abandoned by the client during the wait are not generations.

    For Kontext, `requests` counts submits and polls (every call to the API routes), and a task
    is one generation when first seen `Ready` or `Content Moderated`; result downloads are not
    API calls and are counted apart, in `downloads`.
    """

    requests: int = 0
    generations: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    generated: Counter[tuple[Any, ...]] = field(default_factory=Counter)
    # Kontext result downloads (not API calls), and how many of them carried an Authorization
    # header: a client must send the key only to the API's own origin.
    downloads: int = 0
    downloads_with_auth: int = 0
    _cond: threading.Condition = field(
        default_factory=threading.Condition, init=False, repr=False, compare=False
    )

    @property
    def duplicates(self) -> int:
        """How many distinct generations were produced more than once (money spent twice)."""
        with self._cond:
            return sum(1 for count in self.generated.values() if count > 1)

    def as_dict(self) -> dict[str, Any]:
        with self._cond:
            return {
                "requests": self.requests,
                "generations": self.generations,
                "by_status": dict(self.by_status),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "generated_unique": len(self.generated),
                "generated_duplicates": sum(1 for c in self.generated.values() if c > 1),
                "downloads": self.downloads,
                "downloads_with_auth": self.downloads_with_auth,
            }

    def reset(self) -> None:
        with self._cond:
            self.requests = self.generations = 0
            self.downloads = self.downloads_with_auth = 0
            self.by_status = {}
            self.max_in_flight = self.in_flight
            self.generated = Counter()
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[EmulatorStats], bool], timeout: float = 10.0) -> bool:
        """Block until `predicate(stats)` holds: lets tests wait on events instead of sleeping."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def record_start(self) -> None:
        with self._cond:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._cond.notify_all()

    def record_finish(self, status: int) -> None:
        with self._cond:
            self.in_flight -= 1
            self.by_status[status] = self.by_status.get(status, 0) + 1
            self._cond.notify_all()

    def record_generation(self, key: tuple[Any, ...]) -> None:
        with self._cond:
            self.generations += 1
            self.generated[key] += 1
            self._cond.notify_all()

    def record_download(self, *, with_auth: bool) -> None:
        with self._cond:
            self.downloads += 1
            self.downloads_with_auth += with_auth
            self._cond.notify_all()
