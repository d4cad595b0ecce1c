"""Fixtures that start real parts: a private Redis per test session, real worker processes.

Nothing here touches a Redis or a port it did not start: the Redis is the
embedded default (its own port, password and temp dir), DP control ports are
picked free, multicast stays on 127.0.0.1 with TTL 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller import demo
from mcsite.celeryapp import app, configure
from mcsite.embedded_redis import EmbeddedRedis
from mcsite.procs import ProcessGroup, python_module, site_env
from mcsite.state import State

free_udp_port = demo.free_udp_port  # one helper for the demo and the tests


@pytest.fixture(scope="session", autouse=True)
def private_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keys the tests' controllers and DPs create live in a temp dir, never in the user's home."""
    home = tmp_path_factory.mktemp("xdg-data")
    saved = {k: os.environ.get(k) for k in ("XDG_DATA_HOME", "MCDEPLOY_CONTROLLER_KEY_FILE")}
    os.environ["XDG_DATA_HOME"] = str(home)
    os.environ["MCDEPLOY_CONTROLLER_KEY_FILE"] = str(home / "controller.key")
    try:
        yield home
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@dataclass
class Site:
    """A running site: controller worker and one DP agent on the test's Redis."""

    url: str
    state: State
    dp: str
    control_port: int
    env: dict[str, str]
    procs: ProcessGroup
    logdir: Path

    @property
    def dp_addr(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    def client(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a client agent to completion."""
        return subprocess.run(python_module("clientagent", "--dp", self.dp_addr, *args), env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def spawn_client(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(python_module("clientagent", "--dp", self.dp_addr, *args), env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def mcdeploy(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(python_module("controller", *args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")


def start_site(redis_server: EmbeddedRedis, tmp: Path, dp: str) -> Site:
    configure(app, redis_server.url)
    state = State.from_url(redis_server.url)
    port = free_udp_port()
    env = site_env(redis_server.url, MCDEPLOY_DP_MAX_RATE_MBPS="800", MCDEPLOY_DP_HEARTBEAT_S="0.5",
                   MCDEPLOY_DP_KEY_FILE=str(tmp / "dp.key"))
    procs = ProcessGroup()
    logdir = tmp / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    procs.spawn("controller", python_module("controller", "worker", "--loglevel", "INFO"), env,
                stdout=open(logdir / "controller.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    procs.spawn("dp", python_module("dpagent", "--name", dp, "--control-port", str(port)), env,
                stdout=open(logdir / "dp.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    deadline = time.monotonic() + 30
    while state.get_dp(dp) is None or not _worker_ready(logdir / "controller.log"):
        if time.monotonic() > deadline:
            procs.stop()
            raise RuntimeError("site did not start: " + (logdir / "dp.log").read_text()[-2000:])
        time.sleep(0.1)
    return Site(redis_server.url, state, dp, port, env, procs, logdir)


def _worker_ready(log: Path) -> bool:
    try:
        return b" ready." in log.read_bytes()
    except OSError:
        return False


@pytest.fixture(scope="module")
def site(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> Iterator[Site]:
    name = "dp-" + request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")
    s = start_site(redis_server, tmp_path_factory.mktemp("site"), name)
    try:
        yield s
    finally:
        s.procs.stop()


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "image.img"
    path.write_bytes(os.urandom(4 * 1024 * 1024 + 777))
    return path


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


PY = sys.executable


class CliResult:
    """What an in-process ``mcdeploy`` command returned and printed (the shape of a CompletedProcess)."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(site: Site, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """``mcdeploy ARGS`` in this process against ``site`` (the same code as the command, without a second of
    interpreter start-up per call)."""
    from controller.cli import main

    for k, v in site.env.items():
        if k.startswith("MCDEPLOY_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        return CliResult(rc, out, err)

    return run
