"""Limits that must hold while bytes arrive, not after: the emulator's request-body cap (checked
from Content-Length, then counted as a chunked body streams) and the one wall-clock deadline over
an input-image download (headers, hops and body alike).

The emulator runs as a real server in a subprocess, so its memory is its own and readable from
/proc/<pid>/status; the trickling server is a raw socket on loopback.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flux_flows.emulator import MAX_BODY_BYTES
from flux_flows.inputs import images as images_in
from flux_flows.inputs.images import InputImageError, resolve_input_image
from flux_flows.inputs.public_urls import ALLOW_PRIVATE_URLS_ENV, UrlFetchError, fetch_public_url

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads process memory from /proc"
)

GENERATE = "/inference/v1/workflows/accounts/fireworks/models/flux-1-schnell-fp8/text_to_image"
KONTEXT = "/inference/v1/workflows/accounts/fireworks/models/flux-kontext-pro"
MIB = 1024 * 1024
STREAMED_MIB = 600
RSS_CEILING_KB = 100 * 1024

# The emulator in its own process, without an API key (it accepts any): prints its origin and
# control token, then serves until its stdin closes.
_SERVE = """
import sys
from flux_flows.emulator import Emulator
with Emulator() as emu:
    print(emu.url, emu.control_token, flush=True)
    sys.stdin.read()
"""


class RemoteEmulator:
    def __init__(self, proc: subprocess.Popen[str], url: str, token: str) -> None:
        self.proc, self.url, self.token = proc, url, token

    def memory_kb(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (the peak since the process started), in kB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
        return fields


@pytest.fixture(scope="module")
def remote() -> Iterator[RemoteEmulator]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()  # blocks until the server is up (or died)
        assert len(line) == 2, f"the emulator did not start (exit {proc.poll()})"
        yield RemoteEmulator(proc, line[0], line[1])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Upload:
    """A chunked body of `mib` MiB made on the fly, counting what the client actually handed over."""

    def __init__(self, mib: int = STREAMED_MIB) -> None:
        self.mib = mib
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        chunk = b"x" * MIB
        for _ in range(self.mib):
            self.sent += len(chunk)
            yield chunk


def _post_stream(url: str, headers: dict[str, str] | None = None) -> tuple[httpx.Response, Upload]:
    upload = Upload()
    response = httpx.post(url, content=upload, headers=headers or {}, timeout=60)
    return response, upload


def _assert_refused_early(
    response: httpx.Response, upload: Upload, status: int, limit: int = 0
) -> None:
    assert response.status_code == status, response.text
    assert response.headers.get("connection") == "close"
    # The server stopped reading: the client handed over the limit and what the socket buffers
    # held, no more.
    sent = upload.sent / MIB
    assert upload.sent < limit + 32 * MIB, f"{sent:.0f} MiB went out before the refusal"


@pytest.mark.parametrize(
    ("path", "auth", "limit"),
    [
        (GENERATE, True, MAX_BODY_BYTES),
        (KONTEXT, True, 32 * MIB),
        ("/_emulator/config", False, MAX_BODY_BYTES),  # the control token instead of a key
    ],
)
def test_a_chunked_body_over_the_limit_is_refused_as_it_streams(
    remote: RemoteEmulator, path: str, auth: bool, limit: int
) -> None:
    headers = (
        {"Authorization": "Bearer any-key-will-do"} if auth else {"X-Emulator-Token": remote.token}
    )
    started = time.monotonic()
    response, upload = _post_stream(remote.url + path, headers)
    elapsed = time.monotonic() - started
    _assert_refused_early(response, upload, 413, limit)
    error = response.json()["error"]
    assert error["code"] == "PAYLOAD_TOO_LARGE"
    assert error["message"] == f"request body is larger than {limit} bytes"
    assert response.json()["request_id"] == response.headers["x-request-id"]
    memory = remote.memory_kb()
    print(f"{path}: {upload.sent / MIB:.0f} MiB sent, {elapsed:.2f} s, emulator {memory} kB")
    assert memory["VmHWM"] < RSS_CEILING_KB, memory


def test_an_answer_before_the_body_is_read_stops_the_upload(remote: RemoteEmulator) -> None:
    """No key: the 401 comes before the body is read, and the server stops reading there."""
    response, upload = _post_stream(remote.url + GENERATE)
    _assert_refused_early(response, upload, 401)
    assert remote.memory_kb()["VmHWM"] < RSS_CEILING_KB


def _raw_request(url: str, head: str) -> bytes:
    """Send only a request head (no body) and read until the server closes the connection."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode("ascii"))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_sent(
    remote: RemoteEmulator,
) -> None:
    """600 MB announced, not a byte of it sent: the 413 comes anyway, then the close."""
    head = (
        f"POST {GENERATE} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Authorization: Bearer any-key-will-do\r\nContent-Type: application/json\r\n"
        f"Content-Length: {STREAMED_MIB * MIB}\r\n\r\n"
    )
    started = time.monotonic()
    answer = _raw_request(remote.url, head)  # returns only because the server closed
    assert time.monotonic() - started < 5
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"connection: close" in rest.lower()
    assert b"PAYLOAD_TOO_LARGE" in rest
    assert remote.memory_kb()["VmHWM"] < RSS_CEILING_KB


def test_bodies_within_the_limit_still_work(remote: RemoteEmulator) -> None:
    body = b'{"prompt": "a fox", "seed": 7}'
    headers = {"Authorization": "Bearer k", "Accept": "image/png"}
    with httpx.Client(timeout=30) as client:
        response = client.post(remote.url + GENERATE, content=body, headers=headers)
        assert response.status_code == 200
        assert response.headers.get("connection") != "close"  # keep-alive is untouched
        chunked = client.post(
            remote.url + GENERATE, content=iter([body[:10], body[10:]]), headers=headers
        )
        assert chunked.status_code == 200
        assert chunked.content == response.content


# ---------------------------------------------------------------------------------------------
# One deadline over an input-image download
# ---------------------------------------------------------------------------------------------


class TricklingServer:
    """Accepts connections on loopback and answers each one byte every `gap_s`: the headers, or
    (`phase="body"`) the body after headers sent at once; `phase="redirect"` first redirects
    at once to /next, whose headers trickle."""

    def __init__(self, phase: str = "headers", gap_s: float = 0.5) -> None:
        self.phase = phase
        self.gap_s = gap_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.bytes_sent = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, path: str = "/photo.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while not self.stop.is_set():
                conn, _ = self.sock.accept()
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
        if self.phase != "body":
            slow = head + b"X-Pad: " + b"a" * 4096
        else:
            slow = b"\x89PNG\r\n\x1a\n" + b"a" * 4096
            head += f"Content-Length: {len(slow)}\r\n\r\n".encode()
        with conn, contextlib.suppress(OSError):
            request = conn.recv(65536)
            if self.phase == "redirect" and not request.startswith(b"GET /next"):
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /next\r\nContent-Length: 0\r\n\r\n")
                return
            if self.phase == "body":
                conn.sendall(head)
            for byte in slow:
                if self.stop.wait(self.gap_s):
                    return
                conn.sendall(bytes([byte]))
                self.bytes_sent += 1

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture(params=["headers", "body", "redirect"])
def trickling(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TricklingServer]:
    monkeypatch.setenv(ALLOW_PRIVATE_URLS_ENV, "1")  # the test server is on loopback
    server = TricklingServer(request.param)
    yield server
    server.close()


def test_trickled_headers_end_at_the_deadline(trickling: TricklingServer) -> None:
    url = trickling.url("/photo.png?X-Amz-Signature=secret")
    started = time.monotonic()
    with pytest.raises(UrlFetchError) as failure:
        fetch_public_url(url, max_bytes=MIB, timeout_s=30, deadline_s=3)
    elapsed = time.monotonic() - started
    print(f"deadline 3 s, {trickling.phase} trickled: ended after {elapsed:.2f} s")
    assert 3 <= elapsed < 4, elapsed
    message = str(failure.value)
    assert trickling.url("/photo.png") in message and "secret" not in message
    assert "deadline of 3 s" in message
    stage = "reading the body" if trickling.phase == "body" else "waiting for the response headers"
    assert stage in message
    if trickling.phase == "redirect":  # the hop it was on is named too
        assert message.endswith(f"at {trickling.url('/next')})")
    assert trickling.bytes_sent > 1  # it really was trickling, not refused up front


def test_an_input_image_url_has_one_deadline(
    trickling: TricklingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through `resolve_input_image`, which the planner and the client call."""
    monkeypatch.setattr(images_in, "URL_DEADLINE_S", 3.0)
    started = time.monotonic()
    with pytest.raises(InputImageError, match=r"photo\.png: not downloaded within its deadline"):
        resolve_input_image(trickling.url())
    assert time.monotonic() - started < 4


def test_a_fast_download_is_unaffected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that answers at once still gives its bytes, well inside the deadline."""
    monkeypatch.setenv(ALLOW_PRIVATE_URLS_ENV, "1")
    body = b"\x89PNG\r\n\x1a\n" + os.urandom(2048)
    sock = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/ok.png"
        assert fetch_public_url(url, max_bytes=MIB, deadline_s=3) == body
    finally:
        thread.join(10)
        sock.close()
