"""Serving the app on loopback with uvicorn: `Emulator`, a context manager running it in a
background thread (on a port bound before the thread starts, so port 0 works), and `serve`, the
foreground server behind `flux-flows emulator`. Binding anything but loopback is refused, since an
emulator without a key accepts every key.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import sys
import threading
import time
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from flux_flows.emulator.app import create_app, install_log_filter
from flux_flows.emulator.config import API_PREFIX, DEFAULT_PORT, EmulatorConfig, EmulatorStats
from flux_flows.emulator.control import CONTROL_TOKEN_HEADER
from flux_flows.emulator.state import EmulatorState


def _loopback_address(host: str) -> str:
    """Refuse anything but loopback: with api_key=None this server would accept any key."""
    if host.strip().lower() == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"the emulator binds to loopback only (127.0.0.1, ::1 or localhost); got {host!r}"
        )
    return str(address)


def _bind(host: str, port: int) -> socket.socket:
    """Bound and listening before the server starts, so callers know the port at once.

    IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say so, and without it
    every keep-alive answer stalls ~40 ms on Nagle + delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


def _origin(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        http="h11",
        ws="none",
        loop="asyncio",
        server_header=False,
        timeout_graceful_shutdown=1,
    )
    install_log_filter()
    return config


class _ThreadedServer(uvicorn.Server):
    """A uvicorn server that another thread can wait for, and stop without waiting for a tick.

    uvicorn polls `should_exit` every 0.1 s; waking the loop at once halves the cost of a stop,
    which the test suite pays once per test using the `emulator` fixture.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        await super().startup(sockets=sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            assert self._wake is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def request_exit(self) -> None:
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(wake.set)


class Emulator:
    """The emulator on a loopback port, in a background thread; use as a context manager.

    The socket is bound before the server thread starts, so port 0 works and `base_url` is known
    when `start()` returns. Each instance has its own app, state, thread and event loop, so several
    can run in one process.

    In-process users change settings with `configure`; over HTTP, the `/_emulator/config` and
    `/_emulator/reset` routes want `control_headers` (the `control_token`, made per instance).
    """

    def __init__(
        self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._host = _loopback_address(host)
        self._requested_port = port
        self.config = config if config is not None else EmulatorConfig()
        self.stats = EmulatorStats()
        self.app = create_app(self.config, self.stats)
        self._state: EmulatorState = self.app.state.emulator
        self.control_token: str = self.app.state.control_token
        self._port: int | None = None
        self._server: _ThreadedServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = _origin(self._host, self._port) if self._port else "not started"
        return f"Emulator({where}, {self.config!r})"

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the emulator has no address until start() is called")
        return _origin(self._host, self._port)

    @property
    def base_url(self) -> str:
        return self.url + API_PREFIX

    @property
    def control_headers(self) -> dict[str, str]:
        """Headers a request changing settings over HTTP needs (`/_emulator/config`, `reset`)."""
        return {CONTROL_TOKEN_HEADER: self.control_token}

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the emulator has no port until start() is called")
        return self._port

    def start(self, timeout: float = 10.0) -> Emulator:
        if self._thread is not None:
            return self
        sock = _bind(self._host, self._requested_port)
        self._port = int(sock.getsockname()[1])
        server = _ThreadedServer(_uvicorn_config(self.app, self._host, self._port))
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"flux-emulator-{self._port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        deadline = time.monotonic() + timeout
        while not server.ready.wait(0.05):
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"the emulator did not start on {self.url}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let running requests finish (up to 1 s), then end the thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.request_exit()
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def configure(self, **changes: Any) -> None:
        """Change settings while running; all-or-nothing, and a new fault_seed restarts the RNG."""
        self._state.configure(changes)

    def reset_stats(self) -> None:
        """Zero the counters (flaky memory and the rate window are kept: see `reset`)."""
        self.stats.reset()

    def reset(self) -> None:
        """A fresh emulator without restarting: counters, flaky memory, rate window, fault RNG."""
        self._state.reset()


def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    config: EmulatorConfig | None = None,
    *,
    control_token: str | None = None,
) -> None:
    """Run the emulator in the foreground until Ctrl-C or SIGTERM (the CLI's `emulator` command).

    Prints the base URL, then the control token when it made one (a token the caller chose is
    the caller's to keep, and stays out of the terminal's scrollback).
    """
    bind_host = _loopback_address(host)
    app = create_app(
        config if config is not None else EmulatorConfig(),
        EmulatorStats(),
        control_token=control_token,
    )
    sock = _bind(bind_host, port)
    actual_port = int(sock.getsockname()[1])
    server = uvicorn.Server(_uvicorn_config(app, bind_host, actual_port))
    base_url = _origin(bind_host, actual_port) + API_PREFIX
    print(
        f"Fireworks emulator listening: FIREWORKS_BASE_URL={base_url}",
        file=sys.stderr,
        flush=True,
    )
    if not control_token:
        print(
            f"Control routes (/_emulator/config, /_emulator/reset) need the header "
            f"{CONTROL_TOKEN_HEADER}: {app.state.control_token}",
            file=sys.stderr,
            flush=True,
        )
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
