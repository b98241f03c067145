"""The benchmarks' two API servers, each run as this file in its own process (see `servers`).

- `emulator`: the library's emulator app under uvicorn, plus `/_bench/log` (each generation's
  arrival time and status), so rates are measured from the API's side;
- `standin`: a zero-cost stand-in API on raw asyncio that answers every generation with the
  same JPEG, so only the client can be the limit.

Both write their port to `--port-file` (atomically) once they listen on 127.0.0.1. This file
imports nothing from `harness`: it runs as a script, with its own folder on `sys.path`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EMULATOR_TOKEN_ENV = "FLUX_FLOWS_EMULATOR_TOKEN"  # the emulator child's control token


def _publish_port(port_file: str, port: int) -> None:
    tmp = Path(port_file + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)  # atomic: the parent never reads half a number


def _logged(app: Any, arrivals: list[tuple[float, int]]) -> Any:
    """The emulator app, with the arrival and status of every generation logged."""

    async def logged(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path == "/_bench/log":
            if scope["method"] == "POST":
                arrivals.clear()
            head = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": json.dumps(arrivals).encode()})
            return
        if scope["type"] != "http" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        if not path.endswith("/text_to_image"):
            await app(scope, receive, send)
            return
        arrived, status = time.time(), [0]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            arrivals.append((arrived, status[0]))

    return logged


def serve_emulator(argv: Sequence[str]) -> None:
    """`flux_flows.emulator.create_app` under uvicorn, with the request log."""
    parser = argparse.ArgumentParser(prog="serve.py emulator")
    parser.add_argument("--latency", type=float, required=True)
    parser.add_argument("--image-kb", type=int, default=None)
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args(argv)

    import uvicorn

    from flux_flows.emulator import EmulatorConfig, EmulatorStats, create_app

    config = EmulatorConfig(latency_s=args.latency, image_kb=args.image_kb, rpm_limit=args.rpm)
    # The parent resets the emulator between contenders: a change needs the control token.
    app = create_app(config, EmulatorStats(), control_token=os.environ[EMULATOR_TOKEN_ENV])
    # IPPROTO_TCP explicitly, as the library's own server does: asyncio then sets TCP_NODELAY,
    # without which keep-alive answers stall ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    server = uvicorn.Server(
        uvicorn.Config(
            _logged(app, []),
            host="127.0.0.1",
            port=int(sock.getsockname()[1]),
            log_level="warning",
            lifespan="off",
            access_log=False,
            http="h11",
            ws="none",
            loop="asyncio",
            timeout_graceful_shutdown=1,
            backlog=1024,
        )
    )
    _publish_port(args.port_file, int(sock.getsockname()[1]))
    server.run(sockets=[sock])


def make_jpeg(side: int = 96) -> bytes:
    """A small, real, complete JPEG (SOI ... EOI): the client checks both and reads the size."""
    from PIL import Image

    image = Image.new("RGB", (side, side))
    image.putdata(
        [
            ((x * 5) % 256, (y * 3) % 256, ((x ^ y) * 7) % 256)
            for y in range(side)
            for x in range(side)
        ]
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


class StandIn(asyncio.Protocol):
    """HTTP/1.1 keep-alive server: every text_to_image POST gets the same precomputed JPEG.

    Written on raw asyncio rather than an ASGI framework so its own CPU per answer stays in
    the tens of microseconds (a header block and one `json.loads` for the seed); the body is
    one `writelines` of bytes prepared at start-up. The emulator renders each image (8-15 ms
    of CPU): on a 2-core machine it, not the client, would set the rate.
    `GET /_bench/stats` answers {"requests": generations seen so far}.
    """

    def __init__(self, image: bytes, latency_s: float, counter: list[int]) -> None:
        self.image = image
        self.latency_s = latency_s
        self.counter = counter
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # no Nagle stalls on small keep-alive answers
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).split(b"\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                return  # the body is still arriving
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            method, path, *_ = [*head[0].split(b" "), b"", b""]
            reply = self._reply(method, path, body)
            if self.latency_s and method == b"POST":
                asyncio.get_running_loop().call_later(self.latency_s, self._write, reply)
            else:
                self._write(reply)

    def _reply(self, method: bytes, path: bytes, body: bytes) -> list[bytes]:
        if method == b"POST" and path.endswith(b"/text_to_image"):
            self.counter[0] += 1
            try:
                seed = int(json.loads(body).get("seed") or 0)
            except (ValueError, TypeError, AttributeError):
                seed = 0
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(self.image)}\r\nSeed: {seed}\r\n"
                f"Finish-Reason: SUCCESS\r\nx-request-id: standin-{self.counter[0]}\r\n\r\n"
            )
            return [head.encode(), self.image]
        found = method == b"GET" and path == b"/_bench/stats"
        text = json.dumps({"requests": self.counter[0]}).encode() if found else b"not found"
        status = "200 OK" if found else "404 Not Found"
        kind = "application/json" if found else "text/plain"
        head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(text)}\r\n\r\n"
        return [head.encode(), text]

    def _write(self, reply: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(reply)


def serve_standin(argv: Sequence[str]) -> None:
    """The stand-in on 127.0.0.1: `--image-file` bytes (or a 3 KB JPEG) for every generation."""
    parser = argparse.ArgumentParser(prog="serve.py standin")
    parser.add_argument("--image-file", default=None)
    parser.add_argument("--latency", type=float, required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args(argv)
    image = Path(args.image_file).read_bytes() if args.image_file else make_jpeg()
    counter = [0]

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: StandIn(image, args.latency, counter),
            host="127.0.0.1",
            port=0,
            backlog=1024,
        )
        _publish_port(args.port_file, int(server.sockets[0].getsockname()[1]))
        await server.serve_forever()

    asyncio.run(serve())


def main(argv: Sequence[str]) -> int:
    roles = {"emulator": serve_emulator, "standin": serve_standin}
    if not argv or argv[0] not in roles:
        print(f"usage: serve.py {{{'|'.join(roles)}}} ...", file=sys.stderr)
        return 2
    roles[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
