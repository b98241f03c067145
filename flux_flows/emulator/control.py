"""Who may use the `/_emulator/*` control routes: this machine's own tools, never a web page.

Binding to loopback keeps other machines out, not other programs on this one, nor a page in its
browser: a page can POST `text/plain` to `http://127.0.0.1:PORT/_emulator/config` without a
preflight, or rebind its own domain's DNS to 127.0.0.1 and then call the emulator as "same
origin". Either would switch off `api_key` or repoint `kontext_results_url`. So a control route
answers only when

- the `Host` header names this server (127.0.0.1, localhost or ::1, and its port): a rebound
  domain still sends its own name;
- an `Origin` header, if any, is this server's own origin, and `Sec-Fetch-Site`, if any, says
  same-origin (or a typed URL): browsers send these on cross-site requests;
- for a change (config, reset), the `X-Emulator-Token` header holds the token made at start
  (`Emulator.control_token`, printed by `flux-flows emulator`): a custom header a page cannot
  send cross-origin without a preflight this server never grants.

The API routes (generation, Kontext, result downloads) keep answering as Fireworks does, whatever
the Host: a real client behind a tunnel or proxy sends another Host, and they change no setting.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from starlette.requests import Request

from flux_flows.emulator.errors import ApiError

CONTROL_TOKEN_HEADER = "X-Emulator-Token"
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def new_control_token() -> str:
    return secrets.token_urlsafe(24)


def _split_host(value: str) -> tuple[str, int | None] | None:
    """(name, port) of a Host header value; None when it cannot be read."""
    try:
        parts = urlsplit("//" + value)
        return (parts.hostname or "", parts.port)
    except ValueError:
        return None


def _is_this_server(name: str, port: int | None, server: tuple[str, int] | None) -> bool:
    if server is None:
        return False
    bound_host, bound_port = server
    names = {*_LOOPBACK_NAMES, bound_host.strip("[]").lower()}
    return name.lower() in names and (port if port is not None else 80) == bound_port


def _server(request: Request) -> tuple[str, int] | None:
    server = request.scope.get("server")
    if not server or server[1] is None:
        return None
    return str(server[0]), int(server[1])


def check_control_request(request: Request, token: str, *, change: bool) -> None:
    """Raise `ApiError` (403, or 401 for the token) unless the request may use a control route.

    Messages name the rule that failed, never the expected token or the one sent.
    """
    server = _server(request)
    host = _split_host(request.headers.get("host", ""))
    if host is None or not _is_this_server(*host, server):
        raise ApiError(
            403,
            "control routes answer only to Host 127.0.0.1:PORT or localhost:PORT (this "
            "server's own address); another Host is how a web page reaches it by DNS rebinding",
        )
    origin = request.headers.get("origin")
    if origin is not None:
        try:
            parts = urlsplit(origin)
            same = parts.scheme == "http" and _is_this_server(
                parts.hostname or "", parts.port, server
            )
        except ValueError:
            same = False
        if not same:
            raise ApiError(403, "cross-origin requests to the control routes are refused")
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise ApiError(403, "cross-site requests to the control routes are refused")
    if change and not secrets.compare_digest(
        request.headers.get(CONTROL_TOKEN_HEADER, "").encode(), token.encode()
    ):
        raise ApiError(
            401,
            f"changing the emulator needs its control token in the {CONTROL_TOKEN_HEADER} "
            "header (printed by `flux-flows emulator`; Emulator.control_token in Python)",
        )
