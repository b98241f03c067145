"""FluxClient: the synchronous driver of the protocol flow, over one pooled httpx.Client."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from flux_flows.client import _protocol as protocol
from flux_flows.client._config import BaseClient
from flux_flows.models import ImageRequest
from flux_flows.results import GeneratedImage

T = TypeVar("T")
Sleeper = Callable[[float], object]


def drive(flow: protocol.Exchange[T], http: httpx.Client, sleep: Sleeper = time.sleep) -> T:
    """Run a flow to its result on this thread, as httpx's `_send_handling_auth` runs auth flows.

    A step that fails (a transport error, an unreadable input image) is thrown back into the
    flow: only the flow knows whether that failure is retried.
    """
    with closing(flow):
        step = protocol.resume(flow)
        while not isinstance(step, protocol.Done):
            step = protocol.resume(flow, *_perform(step, http, sleep))
        return step.result


def _perform(step: protocol.Step, http: httpx.Client, sleep: Sleeper) -> protocol.Outcome:
    try:
        if isinstance(step, protocol.Sleep):
            return sleep(step.seconds), None
        if isinstance(step, protocol.Offload):
            return step.call(), None
        if isinstance(step, protocol.Follow):
            return http.send(step.request, follow_redirects=True), None
        return http.send(step), None
    except Exception as exc:
        return None, exc


class FluxClient(BaseClient[httpx.BaseTransport, httpx.Client]):
    """Synchronous client; thread-safe, one pooled connection set per instance.

    `transport=` replaces the network, as with `httpx.Client` (e.g. an `httpx.MockTransport`).

    >>> with FluxClient() as client:  # FIREWORKS_API_KEY from the environment
    ...     image = client.generate(ImageRequest(prompt="a red fox in snow", seed=7))
    """

    def _open_pool(self, transport: httpx.BaseTransport | None, **options: Any) -> httpx.Client:
        return httpx.Client(transport=transport, **options)

    def generate(self, request: ImageRequest, *, aws_credentials: Any = None) -> GeneratedImage:
        """Generate one image, retrying what is worth retrying; raises a FluxError subclass.

        Kontext models are submitted, polled and downloaded (see `KontextPolicy`); a moderated
        task comes back as CONTENT_FILTERED with no bytes. `aws_credentials` (a prefect-aws
        block) reads an `s3://` input image; without it the standard AWS configuration is used.
        """
        flow = protocol.generation_flow(self, request, aws_credentials)
        return drive(flow, self._http)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
