"""A prompt file may be someone else's: its input images must not reach this machine's secrets.

Local references are read only as regular files under the size cap; URLs only over http(s), to
public addresses, each redirect hop checked, the body capped while it streams. The loopback
server here is reachable only with the explicit allow switch, and each test shows it is refused
without it (and how many requests reached it: none).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from flux_flows.inputs import images as images_in
from flux_flows.inputs import public_urls
from flux_flows.inputs.images import (
    InputImageError,
    hash_input_images,
    normalize_reference,
    resolve_input_image,
    sha256_hex,
)
from flux_flows.inputs.public_urls import (
    ALLOW_PRIVATE_URLS_ENV,
    UrlRefused,
    fetch_public_url,
    is_private_address,
)
from flux_flows.models import KONTEXT_PRO, ImageRequest

REPO = Path(__file__).resolve().parent.parent


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


class Server:
    """A loopback HTTP server that counts what reached it; routes are set per test."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.streamed = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                if self.path == "/endless":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    chunk = PNG + b"\0" * (64 * 1024 - len(PNG))
                    try:
                        while server.streamed < 64 * 1024 * 1024:
                            self.wfile.write(chunk)
                            server.streamed += len(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                status, headers, body = server.routes.get(self.path, (404, {}, b"no"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.delenv(ALLOW_PRIVATE_URLS_ENV, raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    srv = Server()
    srv.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, PNG)
    yield srv
    srv.close()


def kontext(**fields: Any) -> ImageRequest:
    return ImageRequest.model_validate({"prompt": "make it winter", "model": KONTEXT_PRO, **fields})


# --------------------------------------------------------------------------------------------
# Local references: regular files only, under the cap
# --------------------------------------------------------------------------------------------


def _devices(tmp_path: Path) -> list[Path]:
    link = tmp_path / "innocent.png"
    link.symlink_to("/dev/zero")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    return [Path("/dev/zero"), link, fifo, Path("/dev/urandom")]


def test_devices_links_to_them_and_fifos_are_refused_at_once(tmp_path: Path) -> None:
    for path in _devices(tmp_path):
        started = time.monotonic()
        with pytest.raises(ValidationError, match="not a regular file"):
            kontext(input_image=str(path))
        with pytest.raises(InputImageError, match="not a regular file"):
            resolve_input_image(str(path))
        with pytest.raises(ValueError, match="not a regular file"):
            hash_input_images([str(path)])
        assert time.monotonic() - started < 2.0, path  # refused from stat, nothing read


def test_a_local_file_over_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "huge.png"
    with big.open("wb") as handle:  # sparse: 21 MiB announced, nothing on disk
        handle.write(PNG)
        handle.truncate(images_in.MAX_INPUT_IMAGE_BYTES + 1024 * 1024)
    with pytest.raises(InputImageError, match="the limit is 20 MiB"):
        resolve_input_image(str(big))


@pytest.mark.parametrize(
    "ref", ["file:///dev/zero", "ftp://example.com/cat.png", "gopher://127.0.0.1:70/x"]
)
def test_other_schemes_are_refused_not_read_as_odd_local_paths(ref: str) -> None:
    with pytest.raises(InputImageError, match="not " + ref.split("://")[0] + "://"):
        normalize_reference(ref)
    with pytest.raises(ValidationError, match="local paths, s3://, http"):
        kontext(input_image=ref)


# --------------------------------------------------------------------------------------------
# URLs: public addresses only, unless the user allows private ones
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1%eth0",
        "fd00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    ],
)
def test_private_addresses(address: str) -> None:
    assert is_private_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert not is_private_address(address)


def test_a_loopback_url_is_refused_without_the_switch_and_fetched_with_it(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.url("/cat.png")
    with pytest.raises(InputImageError, match="private address") as refused:
        resolve_input_image(url)
    assert ALLOW_PRIVATE_URLS_ENV in str(refused.value)  # the message says how to allow it
    with pytest.raises(ValueError, match="private address"):
        hash_input_images([url])
    assert server.hits == []

    assert resolve_input_image(url, allow_private_urls=True) == (PNG, "image/png")
    monkeypatch.setenv(ALLOW_PRIVATE_URLS_ENV, "1")
    assert hash_input_images([url]) == {url: sha256_hex(PNG)}
    assert server.hits == ["/cat.png", "/cat.png"]
    with pytest.raises(InputImageError, match="private address"):
        resolve_input_image(url, allow_private_urls=False)  # the parameter wins over the env
    assert len(server.hits) == 2


@pytest.mark.parametrize(
    "host", ["localhost", "2130706433", "0x7f000001", "127.1", "[::1]", "[::ffff:127.0.0.1]"]
)
def test_other_spellings_of_this_machine_are_refused_before_connecting(
    server: Server, host: str
) -> None:
    with pytest.raises(UrlRefused, match="private address"):
        fetch_public_url(f"http://{host}:{server.port}/cat.png", max_bytes=1024)
    assert server.hits == []


def test_a_dns_answer_that_changes_after_the_check_is_caught_at_the_socket(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolves to a public address for the check, then to loopback for
    the connect. The resolver itself changes its answer (`socket.getaddrinfo`, which both the
    check and the connection ask); nothing in the library is switched off."""
    import socket

    real_getaddrinfo = socket.getaddrinfo
    host = "rebinding.example"
    public, private = "93.184.215.14", "127.0.0.1"  # a global address, then this machine
    answers: list[str] = []

    def rebinding_dns(name: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if name != host:
            return real_getaddrinfo(name, port, *args, **kwargs)
        address = public if not answers else private  # a short TTL: the next answer differs
        answers.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    assert is_private_address(private) and not is_private_address(public)
    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    url = f"http://{host}:{server.port}/cat.png"
    with pytest.raises(UrlRefused, match=r"connected to 127\.0\.0\.1.*nothing was sent"):
        fetch_public_url(url, max_bytes=1024)
    # The check saw the public answer, the connection the private one, and nothing reached it.
    assert answers == [public, private]
    assert server.hits == []
    # The same through the public entry point a prompt file's input_image takes.
    answers.clear()
    with pytest.raises(InputImageError, match=r"connected to 127\.0\.0\.1"):
        resolve_input_image(url)
    assert answers == [public, private] and server.hits == []


def _loopback_counts_as_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 plays the public server; every other private address stays private."""
    real = public_urls.is_private_address
    monkeypatch.setattr(public_urls, "is_private_address", lambda a: a != "127.0.0.1" and real(a))


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("http://127.0.0.2:{port}/cat.png", "127.0.0.2, a private address"),
        ("http://[::1]:{port}/cat.png", "::1, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a private address"),
        ("file:///etc/passwd", "only http:// and https://"),
    ],
)
def test_every_redirect_hop_is_checked(
    server: Server, monkeypatch: pytest.MonkeyPatch, location: str, words: str
) -> None:
    _loopback_counts_as_public(monkeypatch)
    server.routes["/go"] = (302, {"Location": location.format(port=server.port)}, b"")
    with pytest.raises(InputImageError, match=re.escape(words)):
        resolve_input_image(server.url("/go"))
    assert server.hits == ["/go"]  # the public hop only


def test_public_redirects_are_followed_a_few_times_only(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    _loopback_counts_as_public(monkeypatch)
    server.routes["/a"] = (301, {"Location": "/b"}, b"")
    server.routes["/b"] = (307, {"Location": server.url("/cat.png")}, b"")
    assert resolve_input_image(server.url("/a")) == (PNG, "image/png")
    server.routes["/bad"] = (302, {"Location": "http://[::1"}, b"")
    with pytest.raises(InputImageError, match="Invalid URL in location header"):
        resolve_input_image(server.url("/bad"))
    server.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(InputImageError, match="more than 5 redirects"):
        resolve_input_image(server.url("/loop"))
    assert server.hits.count("/loop") == 6


def test_bodies_are_capped_while_they_stream(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ALLOW_PRIVATE_URLS_ENV, "1")
    server.routes["/announced"] = (200, {"Content-Length": str(10**12)}, PNG)
    with pytest.raises(InputImageError, match=r"953674\.3 MiB; the limit is 20 MiB"):
        resolve_input_image(server.url("/announced"))
    with pytest.raises(InputImageError, match="over the limit of 20 MiB"):
        resolve_input_image(server.url("/endless"))  # no Content-Length, never ends
    assert server.streamed < 32 * 1024 * 1024  # stopped near the cap, not at the server's 64 MiB


def test_messages_show_neither_passwords_nor_signatures(server: Server) -> None:
    url = f"http://user:hunter2@127.0.0.1:{server.port}/cat.png?X-Amz-Signature=s3cr3t"
    with pytest.raises(InputImageError) as refused:
        resolve_input_image(url)
    text = str(refused.value)
    assert "hunter2" not in text and "s3cr3t" not in text
    assert f"http://127.0.0.1:{server.port}/cat.png" in text


def test_plan_fetches_nothing_private_from_a_hostile_prompt_file(
    server: Server, tmp_path: Path
) -> None:
    """`flux-flows plan` needs no key: a prompt file must not turn it into a network probe."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "winter", "model": KONTEXT_PRO, "input_image": server.url("/cat.png")},
        {"prompt": "zero", "model": KONTEXT_PRO, "input_image": "/dev/zero"},
    ]
    prompts.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    env = {k: v for k, v in os.environ.items() if k != ALLOW_PRIVATE_URLS_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "flux_flows.cli", "plan", str(prompts), "--to", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "not a regular file" in done.stderr
    assert "Traceback" not in done.stderr
    assert server.hits == []
