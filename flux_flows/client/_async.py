"""AsyncFluxClient: the asyncio driver of the protocol flow, over one pooled httpx.AsyncClient."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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
AsyncSleep = Callable[[float], Awaitable[object]]


async def drive(flow: Flow[T], http: httpx.AsyncClient, sleep: AsyncSleep = asyncio.sleep) -> T:
    """Run a flow to its result without blocking the loop; the same flow `_sync.drive` runs.

    Failed steps go back into the flow, as in the sync driver; a cancellation does not (it
    closes the flow instead, like any BaseException).
    """
    with closing(flow):
        step = resume(flow)
        while not isinstance(step, Done):
            try:
                reply = await _perform(step, http, sleep)
            except Exception as exc:
                step = resume(flow, error=exc)
            else:
                step = resume(flow, reply)
        return step.result


async def _perform(step: Step, http: httpx.AsyncClient, sleep: AsyncSleep) -> Any:
    if isinstance(step, Sleep):
        return await sleep(step.seconds)
    if isinstance(step, Offload):
        return await asyncio.to_thread(step.call)  # a file or S3 read must not stall the loop
    if isinstance(step, Follow):
        return await http.send(step.request, follow_redirects=True)
    return await http.send(step)


class AsyncFluxClient(ClientConfig):
    """Asynchronous twin of FluxClient for asyncio code; it drives the very same flow.

    `transport=` replaces the network, as with `httpx.AsyncClient`.

    >>> async with AsyncFluxClient() as client:
    ...     image = await client.generate(ImageRequest(prompt="a red fox in snow", seed=7))
    """

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(api_key, **kwargs)
        self._http = httpx.AsyncClient(transport=transport, **self._pool_options())

    async def generate(
        self, request: ImageRequest, *, aws_credentials: Any = None
    ) -> GeneratedImage:
        """Generate one image, retrying what is worth retrying; raises a FluxError subclass.

        Same behaviour as `FluxClient.generate`, Kontext included; the input image is read in
        a worker thread so the event loop never blocks on a file or S3.
        """
        flow = generation_flow(self, self._http.build_request, request, aws_credentials)
        return await drive(flow, self._http)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
