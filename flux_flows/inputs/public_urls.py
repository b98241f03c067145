"""Downloading a URL that a prompt file names, without letting the file aim it at this machine.

A prompt file may come from someone else, and its `input_image` URLs are fetched at planning
time (even by `flux-flows plan`, which needs no key): a URL to `http://127.0.0.1:8500/...`, a
cloud metadata address or an intranet host would make the worker probe services that only it can
reach. So, unless the user allows private addresses (`FLUX_FLOWS_ALLOW_PRIVATE_URLS=1`, or
`allow_private=True`):

- only `http://` and `https://` are fetched;
- the host is resolved here and *every* address it resolves to must be public (not loopback,
  private, link-local, shared, reserved, multicast or unspecified, IPv4 hidden in IPv6 included);
- the connection actually made is checked again before a byte is sent (a DNS answer that changes
  between the check and the connect, "DNS rebinding", is caught there), except through a proxy
  the environment configures, whose own address is the user's choice;
- redirects are followed by hand, at most `MAX_REDIRECTS`, each hop checked like the first;
- the body is capped while it streams, and one wall-clock deadline covers the whole download
  (name resolution, connects, headers, every hop and the body; see `_Deadline`).

Nothing here knows about images: callers give the byte limit and word their own errors from
`UrlRefused` (the URL may not be fetched) and `UrlFetchError` (it could not be).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # httpx is imported when a URL is fetched: `models` imports this module's users
    import httpx

__all__ = [
    "ALLOW_PRIVATE_URLS_ENV",
    "MAX_REDIRECTS",
    "UrlFetchError",
    "UrlRefused",
    "UrlTooLarge",
    "fetch_public_url",
    "is_private_address",
    "private_urls_allowed",
    "shown_url",
]

ALLOW_PRIVATE_URLS_ENV = "FLUX_FLOWS_ALLOW_PRIVATE_URLS"
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SETTLE_S = 0.5  # how long a download that passed its deadline is given to notice
_ALLOW_HINT = f"set {ALLOW_PRIVATE_URLS_ENV}=1 to allow private addresses"


class UrlFetchError(Exception):
    """The URL could not be downloaded (network, HTTP status, deadline)."""


class UrlRefused(UrlFetchError):
    """The URL may not be fetched: its scheme, or an address it leads to, is not allowed."""


class UrlTooLarge(UrlFetchError):
    """The body passed the caller's limit: `size` is its announced length when `announced`,
    else how far the download got before it was cut."""

    def __init__(self, message: str, *, size: int, announced: bool) -> None:
        super().__init__(message)
        self.size = size
        self.announced = announced


def private_urls_allowed(allow: bool | None = None) -> bool:
    """`allow` when given, else the environment: off unless the user switched it on."""
    if allow is not None:
        return allow
    return os.environ.get(ALLOW_PRIVATE_URLS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def shown_url(url: str | httpx.URL) -> str:
    """A URL fit for a message: no user:password, no query (presigned URLs carry secrets there)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<an invalid URL>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def is_private_address(address: str) -> bool:
    """True for any address that is not plainly on the public internet.

    `is_global` alone misses multicast, and IPv4 addresses can hide in IPv6 (mapped, 6to4,
    Teredo, NAT64): `::ffff:127.0.0.1` is loopback whatever the IPv6 flags say.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            inner.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            inner.append(ip.sixtofour)
        if ip.teredo is not None:
            inner.extend(ip.teredo)
        if ip in _NAT64:
            inner.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(is_private_address(str(v4)) for v4 in inner):
            return True
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or not ip.is_global
    )


def _host_of(url: httpx.URL) -> str:
    return url.raw_host.decode("ascii")


def _check_public(url: httpx.URL) -> None:
    """Resolve the host here and refuse it if any of its addresses is private."""
    host = _host_of(url)
    if not host:
        raise UrlRefused(f"{shown_url(url)} names no host")
    try:
        infos = socket.getaddrinfo(host, url.port or 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlFetchError(f"cannot resolve the host of {shown_url(url)}: {exc}") from exc
    for info in infos:
        address = str(info[4][0])
        if is_private_address(address):
            raise UrlRefused(
                f"{shown_url(url)} leads to {address}, a private address (loopback, private "
                f"network, link-local, reserved or multicast); only public URLs are fetched: "
                + _ALLOW_HINT
            )


def _through_proxy(url: httpx.URL) -> bool:
    """Whether the environment sends this URL through a proxy (then the peer is the proxy)."""
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass_environment(_host_of(url), proxies)  # type: ignore[attr-defined]  # in the stdlib, absent from typeshed


def _peer_check(url: httpx.URL) -> Callable[[str, dict[str, Any]], None]:
    """An httpcore trace hook refusing a connection to a private peer before anything is sent."""

    def trace(event: str, info: dict[str, Any]) -> None:
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        if stream is None:
            return
        peer = stream.get_extra_info("server_addr")
        if peer and is_private_address(str(peer[0])):
            stream.close()
            raise UrlRefused(
                f"{shown_url(url)} connected to {peer[0]}, a private address (its DNS answer "
                f"changed after it was checked); nothing was sent: " + _ALLOW_HINT
            )

    return trace


class _Deadline:
    """One wall-clock deadline over a whole download: DNS, connect, headers, hops and body.

    httpx's timeouts bound each network *step* (a read, a connect), so a server that trickles
    a byte every half second never trips them. The download runs on a worker thread; the
    caller waits for it until the deadline, then `expire` shuts down every socket the download
    opened (found through httpcore's trace hook), which wakes whatever read or write it is
    blocked in, and the caller reports the deadline without waiting for the worker any longer.
    """

    def __init__(self, url: str, deadline_s: float) -> None:
        self.url = url
        self.deadline_s = deadline_s
        self.at = time.monotonic() + deadline_s
        self.current = url  # the hop being fetched
        self.stage = "resolving"
        self._lock = threading.Lock()
        self._streams: list[Any] = []
        self.expired = False

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def error(self) -> UrlFetchError:
        where = shown_url(self.current)
        hop = "" if where == shown_url(self.url) else f" at {where}"
        return UrlFetchError(
            f"{shown_url(self.url)}: not downloaded within its deadline of "
            f"{self.deadline_s:g} s (still {self.stage}{hop})"
        )

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: notes each socket (to shut it down) and what is awaited."""
        if event in ("connection.connect_tcp.started", "connection.start_tls.started"):
            self.stage = "connecting"
        elif event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            if stream is None:
                return
            with self._lock:
                self._streams.append(stream)
                expired = self.expired
            if expired:
                _shut_down(stream)
        elif event == "http11.send_request_headers.started":
            self.stage = "sending the request"
        elif event == "http11.receive_response_headers.started":
            self.stage = "waiting for the response headers"
        elif event == "http11.receive_response_body.started":
            self.stage = "reading the body"

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            streams = list(self._streams)
        for stream in streams:
            _shut_down(stream)


def _shut_down(stream: Any) -> None:
    """Wake any thread blocked on the stream's socket: shutdown, unlike close, does that.

    `socket.socket.shutdown` on purpose: `SSLSocket.shutdown` would first drop its SSL object
    under the feet of the thread reading through it.
    """
    sock = stream.get_extra_info("socket")
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _read_body(response: httpx.Response, url: httpx.URL, max_bytes: int) -> bytes:
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > max_bytes:
        raise UrlTooLarge(
            f"{shown_url(url)} is {announced} bytes", size=int(announced), announced=True
        )
    chunks, total = [], 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise UrlTooLarge(
                f"{shown_url(url)} is over {max_bytes} bytes", size=total, announced=False
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _combined(
    *hooks: Callable[[str, dict[str, Any]], None],
) -> Callable[[str, dict[str, Any]], None]:
    def trace(event: str, info: dict[str, Any]) -> None:
        for hook in hooks:
            hook(event, info)

    return trace


def _download(
    url: str, max_bytes: int, timeout_s: float, allowed: bool, deadline: _Deadline
) -> bytes:
    """The download itself, on the worker thread: hops checked one by one, body capped."""
    import httpx

    try:
        current = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UrlRefused(f"{shown_url(url)} is not a valid URL: {exc}") from exc
    with httpx.Client(follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            if deadline.remaining() <= 0:
                raise deadline.error()
            deadline.current, deadline.stage = str(current), "resolving"
            if current.scheme not in ("http", "https"):
                raise UrlRefused(f"{shown_url(current)}: only http:// and https:// are fetched")
            trace: Callable[[str, dict[str, Any]], None] = deadline.trace
            if not allowed:
                _check_public(current)
                if not _through_proxy(current):
                    trace = _combined(_peer_check(current), deadline.trace)
            # Each step waits at most what is left of the deadline (plus a little, so the
            # deadline itself is what the caller reports); the deadline covers the sum.
            step = httpx.Timeout(min(timeout_s, deadline.remaining() + 1.0))
            request = client.build_request(
                "GET", current, timeout=step, extensions={"trace": trace}
            )
            try:
                response = client.send(request, stream=True)
                try:
                    location = response.headers.get("location")
                    if response.status_code in _REDIRECTS and location:
                        current = current.join(location)
                        continue
                    if not response.is_success:
                        raise UrlFetchError(f"{shown_url(current)}: HTTP {response.status_code}")
                    return _read_body(response, current, max_bytes)
                finally:
                    response.close()
            except httpx.HTTPError as exc:
                if deadline.expired:
                    raise deadline.error() from exc
                reason = str(exc).replace(str(current), shown_url(current))
                raise UrlFetchError(
                    f"{shown_url(current)}: {type(exc).__name__}: {reason}"
                ) from exc
    raise UrlFetchError(f"{shown_url(url)}: more than {MAX_REDIRECTS} redirects")


def fetch_public_url(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float = 30.0,
    deadline_s: float = 120.0,
    allow_private: bool | None = None,
) -> bytes:
    """The body of a plain GET (no credentials), with the guards of this module's docstring.

    `timeout_s` bounds each network step, `deadline_s` the whole download, every step included:
    name resolution, connects, response headers, each redirect hop and the body (a server
    trickling a byte a second would otherwise hold a worker for days). At the deadline the
    download's sockets are shut down and `UrlFetchError` names the URL and the deadline.
    Raises `UrlRefused`, `UrlTooLarge` or `UrlFetchError`; messages never show a URL's query
    or password.
    """
    import httpx  # noqa: F401  (imported here, once, not first on the worker thread)

    allowed = private_urls_allowed(allow_private)
    deadline = _Deadline(url, deadline_s)
    outcome: list[tuple[bytes | None, BaseException | None]] = []

    def work() -> None:
        try:
            outcome.append((_download(url, max_bytes, timeout_s, allowed, deadline), None))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((None, exc))

    worker = threading.Thread(target=work, name="flux-url-download", daemon=True)
    worker.start()
    worker.join(deadline.remaining())
    if not outcome:
        deadline.expire()
        # Its sockets are shut, so it ends at once, unless it is stuck in name resolution,
        # which nothing can interrupt: then it is left behind (a daemon), never waited for.
        worker.join(_SETTLE_S)
        raise deadline.error()
    data, error = outcome[0]
    if error is not None:
        raise error
    assert data is not None
    return data
