"""S3 faults injected on the library's own cached client through botocore events."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from botocore.awsrequest import AWSResponse

from flux_flows.storage.s3_client import get_s3_client


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


class S3Faults:
    """Answers PutObject calls whose key matches with an S3 error instead of sending them.

    Registered on `before-send.s3.PutObject` of `get_s3_client()` (the client the flow uses in
    this process); botocore treats the answer as the server's, so its retries apply. `times` is
    how many attempts per object key fail (None: all of them).
    """

    def __init__(self, match: str, status: int = 503, times: int | None = None) -> None:
        self.pattern = re.compile(match)
        self.status = status
        self.times = times
        self.attempts: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        codes = {500: "InternalError", 503: "ServiceUnavailable", 403: "AccessDenied"}
        self.body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{codes.get(status, "Error")}'
            f"</Code><Message>injected by the tests</Message></Error>"
        ).encode()

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        path = urlsplit(request.url).path
        if not self.pattern.search(path):
            return None
        self.attempts[path] += 1
        if self.times is not None and self.failed[path] >= self.times:
            return None
        self.failed[path] += 1
        return AWSResponse(
            request.url, self.status, {"Content-Type": "application/xml"}, _Body(self.body)
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[S3Faults]:
        events = get_s3_client().meta.events
        events.register("before-send.s3.PutObject", self)
        try:
            yield self
        finally:
            events.unregister("before-send.s3.PutObject", self)
