"""FluxClient: the synchronous driver of the protocol flow, over one pooled httpx.Client."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from pydantic import SecretStr

from flux_flows.client._config import ClientConfig
from flux_flows.client._protocol import (
    Done,
    Flow,
    Follow,
    Offload,
    Sleep,
    Step,
    generation_flow,
    resume,
)
from flux_flows.models import GeneratedImage, ImageRequest

T = TypeVar("T")


def drive(flow: Flow[T], http: httpx.Client, sleep: Callable[[float], object] = time.sleep) -> T:
    """Run a flow to its result on this thread, as httpx's `_send_handling_auth` runs auth flows.

    A step that fails (a transport error, an unreadable input image) is thrown back into the
    flow: only the flow knows whether that failure is retried.
    """
    with closing(flow):
        step = resume(flow)
        while not isinstance(step, Done):
            try:
                reply = _perform(step, http, sleep)
            except Exception as exc:
                step = resume(flow, error=exc)
            else:
                step = resume(flow, reply)
        return step.result


def _perform(step: Step, http: httpx.Client, sleep: Callable[[float], object]) -> Any:
    if isinstance(step, Sleep):
        return sleep(step.seconds)
    if isinstance(step, Offload):
        return step.call()
    if isinstance(step, Follow):
        return http.send(step.request, follow_redirects=True)
    return http.send(step)


class FluxClient(ClientConfig):
    """Synchronous client; thread-safe, one pooled connection set per instance.

    `transport=` replaces the network, as with `httpx.Client` (e.g. an `httpx.MockTransport`).

    >>> with FluxClient() as client:  # FIREWORKS_API_KEY from the environment
    ...     image = client.generate(ImageRequest(prompt="a red fox in snow", seed=7))
    """

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(api_key, **kwargs)
        self._http = httpx.Client(transport=transport, **self._pool_options())

    def generate(self, request: ImageRequest, *, aws_credentials: Any = None) -> GeneratedImage:
        """Generate one image, retrying what is worth retrying; raises a FluxError subclass.

        Kontext models are submitted, polled and downloaded (see `KontextPolicy`); a moderated
        task comes back as CONTENT_FILTERED with no bytes. `aws_credentials` (a prefect-aws
        block) reads an `s3://` input image; without it the standard AWS configuration is used.
        """
        flow = generation_flow(self, self._http.build_request, request, aws_credentials)
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
