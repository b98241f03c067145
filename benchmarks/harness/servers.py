"""Launching the stand-in servers, one way for every benchmark.

Each server runs in its own process on 127.0.0.1 so that its CPU is not billed to the client:
the library's emulator or the zero-cost stand-in API (both `serve.py`), moto's S3 server and a
`prefect server start` with a throw-away PREFECT_HOME (so the runs neither pay for nor wait on
Prefect's temporary per-process server, nor touch ~/.prefect). `start_*` returns at once, so
several servers boot together; `Server.ready()` waits for one and returns its URL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.procs import REPO, Processes, free_port, http_json, http_ok, wait_until

SERVE = Path(__file__).resolve().with_name("serve.py")
EMULATOR_TOKEN_ENV = "FLUX_FLOWS_EMULATOR_TOKEN"  # as serve.py reads it
API_KEY = "bench-key"  # the emulator and the stand-in accept any non-empty key


@dataclass
class Server:
    what: str
    proc: subprocess.Popen[bytes]
    check: Callable[[], bool]
    locate: Callable[[], str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> str:
        """Wait until it answers (or fail with why); its URL."""
        wait_until(self.check, self.what, self.proc)
        return self.locate()


def base_env() -> dict[str, str]:
    """This environment without the user's AWS, Prefect, Fireworks and flux-flows settings.

    The children import flux_flows from this checkout even when it is not installed.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "PREFECT_", "FIREWORKS_", "FLUX_FLOWS_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def _port_server(what: str, proc: subprocess.Popen[bytes], port_file: Path) -> Server:
    return Server(
        what, proc, port_file.exists, lambda: f"http://127.0.0.1:{int(port_file.read_text())}"
    )


def start_emulator(
    procs: Processes,
    env: dict[str, str],
    workdir: Path,
    *,
    latency: float,
    control_token: str,
    image_kb: int | None = None,
    rpm: float | None = None,
) -> Server:
    """The library's emulator with `/_bench/log`; its URL is the origin (no API path)."""
    port_file = workdir / "emulator.port"
    command = [sys.executable, str(SERVE), "emulator", "--latency", str(latency)]
    command += ["--port-file", str(port_file)]
    if image_kb:
        command += ["--image-kb", str(image_kb)]
    if rpm:
        command += ["--rpm", str(int(rpm))]
    proc = procs.spawn("emulator", command, {**env, EMULATOR_TOKEN_ENV: control_token})
    return _port_server("the emulator", proc, port_file)


def start_standin(
    procs: Processes,
    env: dict[str, str],
    workdir: Path,
    *,
    latency: float,
    image_file: Path | None = None,
    name: str = "standin",
) -> Server:
    """The zero-cost stand-in API: `image_file`'s bytes, or a 3 KB JPEG, for every image."""
    port_file = workdir / f"{name}.port"
    command = [sys.executable, str(SERVE), "standin", "--latency", str(latency)]
    command += ["--port-file", str(port_file)]
    if image_file is not None:
        command += ["--image-file", str(image_file)]
    return _port_server("the stand-in API", procs.spawn(name, command, env), port_file)


def standin_requests(url: str) -> int:
    """Generations the stand-in at `url` has answered so far."""
    return int(http_json(url + "/_bench/stats")["requests"])


def start_moto(procs: Processes, env: dict[str, str]) -> Server:
    """moto's S3 server; `python -m moto.server` from this interpreter, not a `moto_server`
    found on PATH that may belong to another Python installation."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    port = endpoint.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port]
    return Server(
        "moto", procs.spawn("moto", command, env), lambda: http_ok(endpoint), lambda: endpoint
    )


@dataclass
class PrefectServer:
    server: Server
    home: Path
    api_url: str


def start_prefect_server(procs: Processes, env: dict[str, str], workdir: Path) -> PrefectServer:
    """`prefect server start` on loopback, its database in a temporary PREFECT_HOME."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    prefect_env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
    }
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-ui", "--analytics-off"]
    proc = procs.spawn("prefect-server", command, {**env, **prefect_env})
    server = Server(
        "the Prefect server", proc, lambda: http_ok(api_url + "/health"), lambda: api_url
    )
    return PrefectServer(server, home, api_url)


def client_env(
    env: dict[str, str],
    workdir: Path,
    prefect: PrefectServer,
    base_url: str,
    s3_endpoint: str | None,
) -> dict[str, str]:
    """What every flux-flows child gets: these servers, and nothing of the user's setup."""
    out = {
        **env,
        "PREFECT_HOME": str(prefect.home),
        "PREFECT_API_URL": prefect.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # A user's ~/.aws must not redirect or slow the runs (profiles, SSO, other endpoints).
        "AWS_CONFIG_FILE": str(workdir / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "aws-credentials"),
        "FIREWORKS_API_KEY": API_KEY,
        "FIREWORKS_BASE_URL": base_url,
        "FLUX_FLOWS_SPILL_DIR": str(workdir / "spill"),
    }
    if s3_endpoint:
        out["AWS_ENDPOINT_URL"] = s3_endpoint
    return out
