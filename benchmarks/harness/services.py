"""The two sets of servers the benchmarks run against, started together, stopped on exit.

- `emulator_services`: the library's emulator, moto and a Prefect server (`bench_batch.py`:
  the real API's behaviour, images stored in S3);
- `standin_services`: the zero-cost stand-in, a Prefect server and, if asked, moto
  (`bench_scale.py`, `bench_shared_limit.py`: only the client and Prefect can be the limit).

Every process is registered with the caller's `Processes`, which stops them.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.procs import Processes
from harness.servers import (
    base_env,
    client_env,
    start_emulator,
    start_moto,
    start_prefect_server,
    start_standin,
)


@dataclass
class EmulatorServices:
    emulator_url: str  # origin, e.g. http://127.0.0.1:1234
    control_token: str  # for the emulator's /_emulator/reset
    base_url: str  # FIREWORKS_BASE_URL
    s3_endpoint: str
    prefect_api: str
    pids: dict[str, int]
    env: dict[str, str]  # for children: AWS, Fireworks, Prefect settings


@contextlib.contextmanager
def emulator_services(
    procs: Processes,
    workdir: Path,
    *,
    latency: float,
    image_kb: int | None,
    rpm: float | None,
) -> Iterator[EmulatorServices]:
    """Emulator, moto and a Prefect server, each its own process on loopback."""
    env = base_env()
    prefect = start_prefect_server(procs, env, workdir)
    moto = start_moto(procs, env)
    token = secrets.token_urlsafe(24)
    emulator = start_emulator(
        procs, env, workdir, latency=latency, control_token=token, image_kb=image_kb, rpm=rpm
    )
    emulator_url = emulator.ready()
    s3_endpoint = moto.ready()
    prefect.server.ready()
    base_url = emulator_url + "/inference/v1"
    yield EmulatorServices(
        emulator_url=emulator_url,
        control_token=token,
        base_url=base_url,
        s3_endpoint=s3_endpoint,
        prefect_api=prefect.api_url,
        pids={"emulator": emulator.pid, "moto": moto.pid, "prefect server": prefect.server.pid},
        env=client_env(env, workdir, prefect, base_url, s3_endpoint),
    )


@dataclass
class StandinServices:
    env: dict[str, str]
    standin_url: str
    server_pid: int  # the Prefect server's
    standin_pid: int
    s3_endpoint: str | None = None
    moto_pid: int | None = None
    workers: list[int] = field(default_factory=list)


@contextlib.contextmanager
def standin_services(
    procs: Processes, workdir: Path, *, latency: float, s3: bool
) -> Iterator[StandinServices]:
    """The stand-in API, a Prefect server and (with `s3`) moto, on loopback."""
    env = base_env()
    prefect = start_prefect_server(procs, env, workdir)
    standin = start_standin(procs, env, workdir, latency=latency)
    moto = start_moto(procs, env) if s3 else None
    standin_url = standin.ready()
    s3_endpoint = moto.ready() if moto is not None else None
    prefect.server.ready()
    yield StandinServices(
        env=client_env(env, workdir, prefect, standin_url + "/inference/v1", s3_endpoint),
        standin_url=standin_url,
        server_pid=prefect.server.pid,
        standin_pid=standin.pid,
        s3_endpoint=s3_endpoint,
        moto_pid=moto.pid if moto is not None else None,
    )
