"""FLUX Kontext: what a submitted task's poll answers mean, and the edit's input image.

FLUX.1 answers one call with the image; Kontext is asynchronous: submit, poll `get_result` until
the task is Ready (or moderated, or failed), then download the result's `sample` URL promptly (it
expires). The decisions (how long to wait, what each status means, when a task is lost) live in
`KontextTask` with no I/O, so the protocol loop only sequences them.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from flux_flows.client._config import KontextPolicy
from flux_flows.client._wire import (
    KONTEXT_STATUSES,
    PollAnswer,
    image_size,
    parse_seed,
    sniff_image,
)
from flux_flows.errors import APITimeoutError, InvalidRequestError, ResponseError, ServerError
from flux_flows.inputs.images import (
    InputImageError,
    describe_reference,
    resolve_input_image,
    sha256_hex,
)
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.results import GeneratedImage

logger = logging.getLogger("flux_flows.client")


def kontext_input_data_uri(request: ImageRequest, aws_credentials: Any = None) -> str | None:
    """The edit's image as a data URI, read at send time and checked against the request's hash.

    Reading here rather than storing bytes in the request keeps memory flat in big batches. If
    the file changed since its hash was taken, sending it would store a different picture under
    the old cache key, so that is refused.
    """
    if request.input_image is None:
        return None
    try:
        data, mime = resolve_input_image(request.input_image, aws_credentials)
    except InputImageError as exc:
        raise InvalidRequestError(f"cannot send the input image: {exc}") from exc
    expected = request.input_image_sha256
    if expected and sha256_hex(data) != expected:
        raise InvalidRequestError(
            f"input image {describe_reference(request.input_image)} changed since the request was "
            "made (its SHA-256 no longer matches); nothing was sent. Re-run to use the new image."
        )
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def describe_details(details: Any) -> str:
    if details is None or details == "" or details == {}:
        return "no details given"
    text = details if isinstance(details, str) else json.dumps(details, default=str)
    return text[:200]


@dataclass(frozen=True)
class KontextReady:
    url: str
    seed: int | None


@dataclass(frozen=True)
class KontextModerated:
    status: str
    details: Any


@dataclass
class KontextTask:
    """What the client knows about one submitted Kontext task, and what each poll answer means.

    Pure decisions only (no I/O): how long to wait before the next poll, and whether an answer
    means "keep polling", "download this", "moderated" or an error.
    """

    request: ImageRequest
    request_id: str
    policy: KontextPolicy
    base_url: str
    started: float = field(default_factory=time.monotonic)
    polls: int = 0
    not_found: int = 0
    last_status: str = "submitted"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def next_delay(self) -> float:
        """Seconds to wait before the next poll; raises APITimeoutError once the time is up."""
        remaining = self.policy.timeout_s - self.elapsed()
        if remaining <= 0:
            error = APITimeoutError(
                f"Kontext task {self.request_id} was not finished after "
                f"{self.policy.timeout_s:g} s (last status: {self.last_status}, {self.polls} "
                "polls). Nothing was stored; raise KontextPolicy.timeout_s or re-run later.",
                request_id=self.request_id,
            )
            error.retryable = False  # a re-submit would pay again for the same image
            raise error
        return min(self.policy.delay(self.polls), remaining)

    def advance(self, answer: PollAnswer) -> KontextReady | KontextModerated | None:
        """Digest one poll answer: None means poll again."""
        self.polls += 1
        self.last_status = answer.status
        status = answer.status
        if status == "Pending":
            return None
        if status == "Task not found":
            self.not_found += 1
            early = self.elapsed() <= self.policy.not_found_grace_s
            if early or self.not_found < self.policy.not_found_min_polls:
                return None  # early "not found" is transient: the task is not visible yet
            raise ResponseError(
                f"Fireworks lost Kontext task {self.request_id}: get_result still answers "
                f"'Task not found' {self.elapsed():.1f} s after submit ({self.not_found} "
                "polls). Re-run to submit it again.",
                request_id=self.request_id,
            )
        if status in ("Request Moderated", "Content Moderated"):
            return KontextModerated(status, answer.details)
        if status == "Ready":
            return self._ready(answer)
        if status == "Error":
            error = ServerError(
                f"Fireworks reported an error for Kontext task {self.request_id}: "
                f"{describe_details(answer.details)}. Nothing was generated; re-run to try again.",
                request_id=self.request_id,
            )
            error.retryable = False  # the task itself failed: report it, do not loop on it
            raise error
        raise ResponseError(
            f"Kontext task {self.request_id} has an unknown status {status[:40]!r} (expected "
            f"one of {', '.join(KONTEXT_STATUSES.values())})",
            request_id=self.request_id,
        )

    def _ready(self, answer: PollAnswer) -> KontextReady:
        result = answer.result or {}
        sample = result.get("sample")
        if not isinstance(sample, str) or not sample.strip():
            raise ResponseError(
                f"Kontext task {self.request_id} is Ready but its result has no sample URL",
                request_id=self.request_id,
            )
        url = urljoin(self.base_url + "/", sample.strip())
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise ResponseError(
                f"Kontext task {self.request_id}: the sample is not an http(s) URL",
                request_id=self.request_id,
            )
        return KontextReady(url, parse_seed(result.get("seed")))

    def image(
        self, data: bytes, seed: int | None, latency_s: float, *, attempts: int, throttled: int
    ) -> GeneratedImage:
        width, height = image_size(data)
        return GeneratedImage(
            request=self.request,
            data=data,
            content_type=sniff_image(data),
            seed=seed if seed is not None else self.request.seed,
            finish_reason=FinishReason.SUCCESS,
            request_id=self.request_id,
            latency_s=latency_s,
            width=width,
            height=height,
            attempts=attempts,
            throttled=throttled,
        )

    def moderated(
        self, outcome: KontextModerated, latency_s: float, *, attempts: int, throttled: int
    ) -> GeneratedImage:
        """No image at all (see GeneratedImage): recorded as CONTENT_FILTERED, never as real."""
        logger.info(
            "Kontext task %s: %s (%s)",
            self.request_id,
            outcome.status,
            describe_details(outcome.details),
        )
        return GeneratedImage(
            request=self.request,
            data=b"",
            content_type=self.request.content_type,
            seed=self.request.seed,
            finish_reason=FinishReason.CONTENT_FILTERED,
            request_id=self.request_id,
            latency_s=latency_s,
            width=0,
            height=0,
            attempts=attempts,
            throttled=throttled,
        )
