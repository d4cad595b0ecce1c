"""The DP's UDP control port: receives session-plane datagrams and routes them to sessions.

Server side.  Untrusted input lands here first, so every datagram is size-
checked and decoded by the one codec; anything malformed, oversized,
wrong-version or for an unknown session is dropped and counted, and logged
at most once per source every ``LOG_EVERY_S`` seconds, so a flood can
neither crash the agent nor fill its log.  Sessions are never touched by bad
input.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from clientagent.identity import normalize_mac, normalize_uuid
from mcproto import codec
from mcproto.errors import ConfigError, MessageError
from mcproto.messages import Done, Failed, Join, ManifestGet, Message, NoSession, Status, Target

if TYPE_CHECKING:
    from dpagent.session import SessionRunner

log = logging.getLogger("mcdeploy.dp.host")

LOG_EVERY_S = 10.0
CLIENT_MESSAGES = (Join, Status, Done, Failed, ManifestGet)
LINGER_S = 120.0  # finished sessions still re-acknowledge late results this long
NOT_TARGETED = "not targeted by any deployment on this DP"
NOT_TARGETED_RETRY_MS = 5000
# A scheduled session (start_at) starting later than this (by its start time or start timeout) tells joining
# clients to wait (NoSession with its expected start) rather than offering at once; they join shortly before.
DEFER_LEAD_S = 30.0
WAIT_RETRY_MS = 5000


def _canon(fn: object, text: str | None) -> str | None:
    try:
        return fn(text) if text else None  # type: ignore[operator]
    except ValueError:
        return None


class Targeting:
    """Which clients a session admits: any (anonymous deployments) or the targets its job lists.

    A Join matches a target by its client id (the target's name), its MAC or its SMBIOS UUID.  The
    match is remembered so the session's results and progress carry the target's name.
    """

    def __init__(self, targets: list[Target] | None) -> None:
        self.any = targets is None
        self._by_name = {t.name: t.name for t in targets or []}
        self._by_mac = {t.mac: t.name for t in targets or [] if t.mac}
        self._by_uuid = {t.smbios_uuid: t.name for t in targets or [] if t.smbios_uuid}
        self._joined: dict[str, str] = {}  # join client id -> target name
        self.address: dict[str, str] = {}  # target name -> the address it joined from
        self._lock = threading.Lock()

    def match(self, join: Join) -> str | None:
        """The target this Join is (its name), "" for anyone on an anonymous session, None if not admitted."""
        if self.any:
            return ""
        mac, smbios_uuid = _canon(normalize_mac, join.mac), _canon(normalize_uuid, join.smbios_uuid)
        return (self._by_uuid.get(smbios_uuid or "") or self._by_mac.get(mac or "")
                or self._by_name.get(join.client_id))

    def admit(self, join: Join, name: str, address: str) -> None:
        with self._lock:
            if name:
                self._joined[join.client_id] = name
                self.address[name] = address

    def name_of(self, client_id: str) -> str:
        with self._lock:
            return self._joined.get(client_id, client_id)


class SessionHost:
    """Owns the control socket and the table of sessions on this DP."""

    def __init__(self, name: str, host: str, port: int) -> None:
        """Bind the control port on ``host`` (IPv4 or IPv6 literal, ``fe80::1%eth0``, or a name).

        "::" listens on every address, IPv4 included where the system maps IPv4 into IPv6
        sockets (Linux's default).
        """
        self.name = name
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                                           flags=socket.AI_PASSIVE)[0]
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"cannot listen on UDP {where}: {getattr(exc, 'strerror', None) or exc}") from None
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind(sockaddr)
        except OSError as exc:
            self.sock.close()
            raise ConfigError(f"cannot listen on UDP {where}: {exc.strerror}") from None
        self.sock.settimeout(0.5)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._sessions: dict[int, SessionRunner] = {}
        self._finished: dict[int, tuple[float, SessionRunner]] = {}
        self._targeting: dict[int, Targeting] = {}
        self._cancelled: dict[int, str] = {}  # sessions cancelled before (or while) they registered
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_log: dict[str, float] = {}
        self.bad_datagrams = 0
        self.datagrams = 0
        # The unicast fallback's HTTP server (dpagent.imageserver.ImageServer), or None: no fallback.
        self.http: Any = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SessionHost:
        self._thread = threading.Thread(target=self._serve, name="dp-control", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            runners = list(self._sessions.values())
        for r in runners:
            r.abort("the DP agent is shutting down")
        if self._thread:
            self._thread.join(timeout=2)
        self.sock.close()

    def register(self, runner: SessionRunner, targeting: Targeting | None = None) -> None:
        if self.http is not None and runner.job.unicast_fallback:
            runner.enable_http(self.http)
        with self._lock:
            self._sessions[runner.session_id] = runner
            self._targeting[runner.session_id] = targeting or Targeting(None)
            cancelled = self._cancelled.get(runner.session_id)
        if cancelled is not None:
            runner.abort(cancelled)

    def unregister(self, runner: SessionRunner) -> None:
        with self._lock:
            self._sessions.pop(runner.session_id, None)
            self._finished[runner.session_id] = (time.monotonic(), runner)
        if runner.http is not None:
            runner.http.linger(runner.session_id, LINGER_S)

    def cancel(self, session_id: int, reason: str) -> bool:
        """Abort a session (now, or as soon as it registers); returns whether it was running here."""
        with self._lock:
            self._cancelled[session_id] = reason
            if len(self._cancelled) > 10_000:
                self._cancelled.pop(next(iter(self._cancelled)))
            runner = self._sessions.get(session_id)
        if runner is not None:
            log.info("session %x cancelled: %s", session_id, reason)
            runner.abort(reason)
        return runner is not None

    def cancelled(self, session_id: int) -> str | None:
        with self._lock:
            return self._cancelled.get(session_id)

    def has_session(self, session_id: int) -> bool:
        with self._lock:
            return session_id in self._sessions or session_id in self._finished

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def reply(self, msg: Message, addr: object) -> None:
        try:
            self.sock.sendto(codec.encode(msg), addr)  # type: ignore[arg-type]
        except OSError as exc:
            log.warning("reply to %s failed: %s", addr, exc)

    # ------------------------------------------------------------------ receive path

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                self._purge()
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            self.datagrams += 1
            try:
                self.handle_datagram(data, addr)
            except Exception:  # a bug must not kill the control port
                log.exception("error handling datagram from %s", addr)

    def handle_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        """Decode, route, or drop-and-count one datagram."""
        try:
            msg = codec.decode(data, allowed=CLIENT_MESSAGES)
        except MessageError as exc:
            self._bad(addr, str(exc))
            return
        if isinstance(msg, Join):
            runner, refusal = self._pick(msg, addr)
            if runner is None:
                self.reply(refusal, addr)
                return
        else:
            with self._lock:
                runner = self._sessions.get(msg.session_id)  # type: ignore[attr-defined]
                if runner is None and msg.session_id in self._finished:  # type: ignore[attr-defined]
                    runner = self._finished[msg.session_id][1]  # type: ignore[attr-defined]
            if runner is None:
                self._bad(addr, f"{msg.type} for unknown session")  # type: ignore[attr-defined]
                return
        runner.handle_inbound(msg, addr)

    def _pick(self, join: Join, addr: tuple[str, int]) -> tuple[SessionRunner | None, NoSession]:
        """The session a joining client belongs to, or why none.

        Only sessions that admit it count (collection sessions admit their targets only); of those,
        one that knows it already, then a targeted one, then the one waiting longest.
        """
        with self._lock:
            runners = [(r, self._targeting.get(r.session_id) or Targeting(None))
                       for r in self._sessions.values() if not r.finished]
        if join.deployment:
            runners = [(r, t) for r, t in runners if r.deployment == join.deployment]
        admitted = [(r, t, name) for r, t in runners if (name := t.match(join)) is not None]
        if not admitted:
            delivered = self._delivered(join)
            if delivered is not None:
                return None, delivered
        if not runners:
            return None, NoSession(reason=f"no session on DP {self.name} for client {join.client_id}",
                                   retry_after_ms=2000)
        if not admitted:
            return None, NoSession(reason=NOT_TARGETED, retry_after_ms=NOT_TARGETED_RETRY_MS)
        admitted.sort(key=lambda x: (not x[0].knows(join.client_id), x[2] == "", x[0].opened_at))
        runner, targeting, name = admitted[0]
        if not runner.knows(join.client_id):
            wait = self._wait(runner, join)
            if wait is not None:
                return None, wait
        targeting.admit(join, name, str(addr[0]))
        return runner, NoSession(reason="")

    def _wait(self, runner: SessionRunner, join: Join) -> NoSession | None:
        """"Wait" for a client of a session that starts later than ``DEFER_LEAD_S`` from now, else None."""
        if runner.job.start_at is None:  # only scheduled sessions defer: the others offer at once, as ever
            return None
        expected = runner.expected_start()
        if expected is None or expected - time.time() <= DEFER_LEAD_S:
            return None
        count = runner.defer(join.client_id, time.monotonic())
        if count is None:
            return None
        ready, need = count
        clients = f", {ready} of {need} clients ready" if need else ""
        retry = WAIT_RETRY_MS if need else int(min(60.0, max(1.0, expected - time.time() - DEFER_LEAD_S / 2)) * 1000)
        return NoSession(reason=f"deployment {runner.deployment} on DP {self.name} has not started{clients}",
                         retry_after_ms=retry, expected_start=round(expected, 3))

    def _delivered(self, join: Join) -> NoSession | None:
        """"Nothing for you": a recent session of this DP already delivered this client's image."""
        with self._lock:
            finished = [r for _, r in self._finished.values()]
        for r in finished:
            if (not join.deployment or r.deployment == join.deployment) and r.delivered(join.client_id):
                return NoSession(reason=f"deployment {r.deployment} already delivered its image to "
                                 f"{join.client_id} on DP {self.name}", retry_after_ms=0)
        return None

    def _bad(self, addr: tuple[str, int], why: str) -> None:
        self.bad_datagrams += 1
        src = str(addr[0])
        now = time.monotonic()
        if now - self._last_log.get(src, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_log[src] = now
            if len(self._last_log) > 10_000:
                self._last_log.clear()
            log.warning("dropped datagram from %s: %s (total dropped: %d)", src, why, self.bad_datagrams)

    def _purge(self) -> None:
        now = time.monotonic()
        with self._lock:
            for sid in [s for s, (t, _) in self._finished.items() if now - t > LINGER_S]:
                del self._finished[sid]
                self._targeting.pop(sid, None)
