"""Runs one multicast session: the socket/time adapter around :class:`mcproto.sender.Sender`.

Server side.  The sans-I/O sender decides what to send and when; this module
only moves bytes and time: it reads the image file, sends packets to the
group, hands inbound session-plane messages (delivered by the
:class:`~dpagent.host.SessionHost` thread) to the sender under a lock, and
turns sender events into relayed results.  Replies to a client's ``Done`` go
out only after its result was handed to the relay, so an ``Ack`` means
"recorded or spooled", never "maybe".
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientagent.net import interface_index, is_ipv6
from clientagent.udpio import BatchSender
from mcproto import codec, keyexchange
from mcproto.errors import ConfigError
from mcproto.events import ClientFinished, ClientJoined, ClientTooSlow, SessionFinished, TransferStarted
from mcproto.messages import (
    MANIFEST_PART_BYTES,
    Ack,
    Announce,
    ClientResult,
    Done,
    Drop,
    Failed,
    Join,
    ManifestGet,
    ManifestPart,
    Message,
    NoSession,
    Offer,
    SessionJob,
    SessionReport,
    Status,
)
from mcproto.sender import FINISHED, WAITING, RatePolicy, Sender, SenderConfig, StartPolicy
from mcproto.tiers import TieredSession
from mcsite.settings import DPSettings

log = logging.getLogger("mcdeploy.dp.session")

PROGRESS_EVERY_S = 1.0
# Unicast fallback: a client dropped from the multicast (with unicast allowed) fetching over HTTP is
# waited for this long after its last sign of life (a Status keepalive or an HTTP read).
UNICAST_IDLE_S = 30.0
DEFER_SEEN_S = 15.0  # a client told to wait counts towards the start while it asked again within this


def open_data_socket(interface: str, ttl: int, group: str = "") -> socket.socket:
    """A UDP socket that sends multicast to ``group`` out of ``interface`` only, with ``ttl``.

    The family follows the group: an IPv4 group needs ``interface`` as an IPv4 address
    (IP_MULTICAST_IF takes an address); an IPv6 group takes an interface name, index or
    address, resolved to the index IPV6_MULTICAST_IF takes (see
    :func:`clientagent.net.interface_index`).  Loopback delivery stays on: clients may run on
    this host.  When ``interface`` is an address the socket is bound to it, so the packets'
    source (which announces with an empty control host point at) is that address.
    """
    if is_ipv6(group):
        try:
            ifindex = interface_index(interface)
        except ValueError as exc:
            raise ConfigError(f"multicast interface: {exc}") from None
        if ifindex == 0 and interface not in ("", "::"):
            raise ConfigError(f"cannot find the network interface of {interface!r} for IPv6 multicast "
                              "(give its name, e.g. eth0)")
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            if is_ipv6(interface):
                sock.bind(socket.getaddrinfo(interface, 0, socket.AF_INET6, socket.SOCK_DGRAM)[0][4])
        except BaseException:
            sock.close()
            raise
        return sock
    try:
        local = socket.inet_aton(interface)
    except OSError:
        raise ConfigError(f"multicast to the IPv4 group {group or '(none)'} needs the interface as an IPv4 "
                          f"address, not {interface!r}") from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, local)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # clients may share this host
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        sock.bind((interface, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class SessionRunner:
    """One session's adapter; ``run()`` blocks until the session has finished."""

    def __init__(self, job: SessionJob, settings: DPSettings, reply: Callable[[Message, object], None],
                 relay: Any, progress: Callable[[dict[str, Any]], None] | None = None,
                 control: tuple[str, int] | None = None, identity: Ed25519PrivateKey | None = None,
                 epoch: int = 0) -> None:
        """``control``: the address clients reach the control port at; when given, the session is
        announced on its group so clients that know only the group (``--discover``) find it."""
        self.job = job
        self.session_id = job.session_id
        self.deployment = job.deployment
        self.settings = settings
        self.opened_at = time.monotonic()
        rate_mbps = min(job.max_rate_mbps or settings.max_rate_mbps, settings.max_rate_mbps)
        self.config = SenderConfig(
            session_id=job.session_id, deployment=job.deployment, group=job.group, port=job.port,
            image_size=job.image.size, image_sha256=job.image.sha256, symbol_size=settings.symbol_size,
            block_symbols=settings.block_symbols, fec=settings.fec, repair_symbols=settings.repair_symbols,
            expected_clients=job.expected_clients,
            start=StartPolicy(
                clients=job.start_clients or job.expected_clients, delay=job.start_timeout_s,
                at=None if job.start_at is None else self.opened_at + (job.start_at - time.time()),
            ),
            rate=RatePolicy(
                min_rate=(job.min_rate_mbps or min(8.0, rate_mbps)) * 1e6 / 8, slow_policy=job.slow_policy,
                drop_below=(job.drop_below_mbps or 0.0) * 1e6 / 8, unicast_fallback=job.unicast_fallback,
                slow_grace=job.slow_grace_s,
            ),
            join_window=job.start_timeout_s, max_rate=rate_mbps * 1e6 / 8, deadline=job.deadline_s,
            announce=b"" if control is None else codec.encode(Announce(
                session_id=job.session_id, deployment=job.deployment, control_host=control[0],
                control_port=control[1], image_size=job.image.size)),
        )
        self._identity = identity if settings.encrypt and job.encrypt else None
        if self._identity is None:
            log.warning("deployment=%s is NOT ENCRYPTED: its image crosses the network in the clear and its "
                        "packets are not authenticated (%s)", job.deployment,
                        "the deployment asked for it" if not job.encrypt else
                        "this DP has MCDEPLOY_DP_ENCRYPT=false" if not settings.encrypt else "no DP identity")
        try:
            self._manifest = base64.b64decode(job.image.manifest, validate=True) if job.image.manifest else b""
        except ValueError:
            raise ConfigError(f"the session job of {job.deployment} carries a malformed manifest") from None
        if self._identity is not None:
            # A fresh key per session; the epoch (the lease's fencing number) keeps nonces unique even if
            # this session is re-dispatched to another sender with the same key.
            self._session_key = os.urandom(32)
            self.config = dataclasses.replace(self.config, key=self._session_key, epoch=epoch % 2**32,
                                              offer_hook=self._complete_offer, seal_announce=False)
        elif self._manifest or job.unicast_fallback:
            self.config = dataclasses.replace(self.config, offer_hook=self._complete_offer)
        self._file = open(job.image.path, "rb")  # noqa: SIM115 - closed in run()
        self.sender = self._make_sender()
        self._reply = reply
        self._relay = relay
        self._progress = progress
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._abort_reason = ""
        self.send_errors = 0
        self.udp_send = ""
        # Unicast fallback (see dpagent.imageserver): the HTTP server's view of this session, the clients
        # dropped from the multicast that may fetch over HTTP (id -> last sign of life), finished ones,
        # and the path each client's Done named.
        self.http: Any = None
        self._served: Any = None
        self._http_secret = os.urandom(32)
        self._unicast: dict[str, float] = {}
        self._unicast_done: dict[str, Ack] = {}
        self._paths: dict[str, str] = {}
        self._deferred: dict[str, float] = {}  # clients told to wait for the start -> when they last asked

    def enable_http(self, server: Any) -> None:
        """Serve this session's image on ``server`` (a :class:`dpagent.imageserver.ImageServer`) to its clients."""
        from dpagent.imageserver import served_for

        self.http = server
        self._served = served_for(self.session_id, self.job.image.path, self.job.image.size,
                                  self._session_key if self._identity is not None else None, self.knows,
                                  self._http_secret)
        server.add(self._served)

    def _complete_offer(self, offer: Offer, join: Join) -> Offer | NoSession:
        """Name the manifest's length, wrap the session key to the joining client's key and sign the offer
        (called under the lock)."""
        if self._manifest:
            offer = offer.model_copy(update={"manifest_bytes": len(self._manifest)})
        if self.http is not None:
            from clientagent.unicast import token

            offer = offer.model_copy(update={"http_url": self.http.url(self.session_id),
                                             "http_token": token(self._http_secret, self.session_id, join.client_id)})
        if self._identity is None:
            return offer
        if join.client_key is None:
            return NoSession(reason="this session is encrypted and the client sent no key: update the client agent")
        eph, box = keyexchange.wrap(self._session_key, join.client_key, offer.session_id, join.client_id)
        sealed = offer.model_copy(update={"encrypted": True, "eph_key": eph, "key_box": box})
        return keyexchange.sign_offer(sealed, self._identity)

    def _make_sender(self) -> Sender | TieredSession:
        """One sender, or a tiered session when the deployment moves slow clients to slower streams."""
        if self.job.slow_policy == "tier" and self.job.tiers:
            cap = self.settings.max_rate_mbps
            tiers = [(self.job.group, self.job.port, self.config.max_rate)] + [
                (t.group, t.port, min(t.max_rate_mbps, cap) * 1e6 / 8) for t in self.job.tiers]
            return TieredSession(self.config, tiers, self._read, self.opened_at)
        return Sender(self.config, self._read, self.opened_at)

    @property
    def finished(self) -> bool:
        return self.sender.state == FINISHED

    def knows(self, client_id: str) -> bool:
        return client_id in self.sender.clients

    def delivered(self, client_id: str) -> bool:
        """This client's image was delivered and verified in this session (by either path)."""
        with self._lock:
            client = self.sender.clients.get(client_id)
            acked = self._unicast_done.get(client_id)
            return (getattr(client, "state", "") == "done") or (acked is not None and acked.outcome == "done")

    def expected_start(self) -> float | None:
        """While the session waits for its start: when its start policy starts it at the latest (Unix time).

        The earliest of its start time and its opening plus its start timeout; None once started (or
        with no time condition: it starts when enough clients joined).
        """
        with self._lock:
            if self.sender.state != WAITING:
                return None
            start = self.config.start
        mono = [t for t in (start.at, None if start.delay is None else self.opened_at + start.delay) if t is not None]
        return time.time() + (min(mono) - time.monotonic()) if mono else None

    def defer(self, client_id: str, now: float) -> tuple[int, int] | None:
        """Whether a client asking now should wait instead of joining: (ready, needed), or None to offer.

        Clients told to wait still count towards a start by client count: once those that joined plus
        those waiting (asked within ``DEFER_SEEN_S``) reach it, everyone is offered the session.
        """
        with self._lock:
            self._deferred[client_id] = now
            for c in [c for c, t in self._deferred.items() if now - t > DEFER_SEEN_S]:
                del self._deferred[c]
            ready = len(self.sender.clients) + sum(1 for c in self._deferred if c not in self.sender.clients)
            need = self.config.start.clients
        if need and ready >= need:
            return None
        return ready, need

    @property
    def unicast_clients(self) -> int:
        """Clients dropped from the multicast still fetching over HTTP."""
        with self._lock:
            return len(self._unicast)

    def _read(self, offset: int, length: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(length)

    # ------------------------------------------------------------------ called from the host thread

    def handle_inbound(self, msg: Message, addr: object) -> None:
        """A decoded client message: feed the sender, relay events, then send replies."""
        if isinstance(msg, ManifestGet):
            self._serve_manifest(msg, addr)
            return
        if isinstance(msg, Done | Failed | Status) and self._on_unicast(msg, addr):
            return
        if isinstance(msg, Done):
            with self._lock:
                self._paths[msg.client_id] = msg.path
        with self._lock:
            self.sender.handle_message(msg, addr, time.monotonic())
            events, replies = self._drain()
        self._dispatch(events, replies)
        self._wake.set()

    def _serve_manifest(self, msg: ManifestGet, addr: object) -> None:
        """A part of the signed manifest, to clients that joined this session (it is public, but not for all)."""
        with self._lock:
            known = msg.client_id in self.sender.clients
        if not known or msg.offset >= len(self._manifest):
            return
        part = self._manifest[msg.offset:msg.offset + MANIFEST_PART_BYTES]
        self._reply(ManifestPart(session_id=self.session_id, offset=msg.offset, total=len(self._manifest),
                                 data=part), addr)

    def _on_unicast(self, msg: Done | Failed | Status, addr: object) -> bool:
        """A message of a client dropped from the multicast that fetches over HTTP; False: not such a client."""
        with self._lock:
            if msg.session_id != self.session_id:
                return False
            acked = self._unicast_done.get(msg.client_id)
            if acked is not None:
                if not isinstance(msg, Status):
                    self._reply(acked, addr)  # a repeated result: the same answer
                return True
            if msg.client_id not in self._unicast:
                return False
            self._unicast[msg.client_id] = time.monotonic()
            if isinstance(msg, Status):
                return True
            client = self.sender.clients.get(msg.client_id)
            address = str(getattr(client, "address", "") or addr)
            del self._unicast[msg.client_id]
        if isinstance(msg, Done):
            ok = msg.sha256 == self.job.image.sha256 and msg.bytes == self.job.image.size
            result = ClientResult(
                deployment=self.deployment, session_id=self.session_id, dp=self.job.dp, client_id=msg.client_id,
                outcome="done" if ok else "failed", sha256=msg.sha256,
                reason="" if ok else "digest reported by client does not match the image",
                bytes=msg.bytes if ok else 0, seconds=msg.seconds, address=address[:128], path=msg.path)
        else:
            result = ClientResult(deployment=self.deployment, session_id=self.session_id, dp=self.job.dp,
                                  client_id=msg.client_id, outcome="failed",
                                  reason=f"unicast fallback: {msg.reason}"[:500], address=address[:128])
        log.info("client %s by %s deployment=%s client=%s %s", result.outcome, result.path, self.deployment,
                 msg.client_id, result.reason)
        self._relay.send(result)  # recorded or spooled before the client hears the ack
        ack = Ack(session_id=self.session_id, client_id=msg.client_id, outcome=result.outcome, reason=result.reason)
        with self._lock:
            self._unicast_done[msg.client_id] = ack
        self._reply(ack, addr)
        self._wake.set()
        return True

    def _expire_unicast(self, now: float, reason: str = "") -> None:
        """Fail unicast clients silent for ``UNICAST_IDLE_S`` (all of them with ``reason``)."""
        with self._lock:
            gone = [c for c, seen in self._unicast.items() if reason or now - max(
                seen, self._served.last_seen.get(c, 0.0) if self._served is not None else 0.0) > UNICAST_IDLE_S]
            for c in gone:
                del self._unicast[c]
        for c in gone:
            why = reason or f"unicast fallback: no word from the client for {UNICAST_IDLE_S:g} s"
            log.info("client failed deployment=%s client=%s %s", self.deployment, c, why)
            self._relay.send(ClientResult(deployment=self.deployment, session_id=self.session_id, dp=self.job.dp,
                                          client_id=c, outcome="failed", reason=why[:500]))

    def abort(self, reason: str) -> None:
        self._abort_reason = reason
        self._wake.set()

    # ------------------------------------------------------------------ the send loop

    def run(self) -> dict[str, Any]:
        """Send until the session finishes; returns final statistics."""
        try:
            if is_ipv6(self.job.group):
                if not self.settings.mcast_interface6:
                    raise ConfigError(f"session group {self.job.group} is IPv6 but this DP has no "
                                      "MCDEPLOY_DP_MCAST_INTERFACE6 set")
                iface = self.settings.mcast_interface6
            else:
                iface = self.settings.mcast_interface
            sock = open_data_socket(iface, self.settings.mcast_ttl, self.job.group)
        except BaseException:
            self._file.close()
            raise
        next_progress = 0.0
        batch = BatchSender(sock)  # UDP GSO where the kernel has it: one system call per run of equal datagrams
        self.udp_send = batch.mode
        log.info("session %s sends with %s", self.job.deployment, batch.mode)
        try:
            while True:
                now = time.monotonic()
                with self._lock:
                    if self._abort_reason:
                        self.sender.abort(self._abort_reason, now)
                    self.sender.handle_timer(now)
                    pkts = self.sender.addressed_datagrams(now, 64)
                    events, replies = self._drain()
                    timer = self.sender.get_timer()
                batch.send(pkts)
                self.send_errors = batch.errors
                self._dispatch(events, replies)
                if now >= next_progress:
                    next_progress = now + PROGRESS_EVERY_S
                    self._report_progress(now)
                if self.finished and timer == float("inf"):
                    # The multicast is over; clients dropped to unicast are waited for (bounded).
                    if self._abort_reason:
                        self._expire_unicast(now, self._abort_reason)
                    elif now - self.opened_at >= self.job.deadline_s:
                        self._expire_unicast(now, "session deadline reached")
                    else:
                        self._expire_unicast(now)
                    if not self.unicast_clients:
                        break
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                delay = timer - time.monotonic()
                if delay > 0:
                    self._wake.wait(min(delay, 0.1))
                    self._wake.clear()
        finally:
            sock.close()
            self._file.close()
        self._report_progress(time.monotonic())
        return self.stats()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = dict(self.sender.stats())
        s["session_state"] = s.pop("state")
        elapsed = max(1e-6, time.monotonic() - (self.sender.started_at or self.opened_at))
        s["rate_mbps"] = round(s["bytes_sent"] * 8 / elapsed / 1e6, 1)
        s["finish_reason"] = self.sender.finish_reason or self._abort_reason
        return s

    # ------------------------------------------------------------------ helpers

    def _drain(self) -> tuple[list[Any], list[tuple[Message, object]]]:
        events = []
        while (ev := self.sender.next_event()) is not None:
            events.append(ev)
        return events, self.sender.replies()  # type: ignore[return-value]

    def _dispatch(self, events: list[Any], replies: list[tuple[Message, object]]) -> None:
        job = self.job
        dropped = {m.client_id for m, _ in replies
                   if isinstance(m, Drop) and m.unicast_allowed and self.http is not None}
        for ev in events:
            if isinstance(ev, ClientJoined):
                log.info("client joined deployment=%s client=%s from=%s", job.deployment, ev.client_id,
                         ev.address)
            elif isinstance(ev, TransferStarted):
                log.info("transfer started deployment=%s clients=%d reason=%s", job.deployment, ev.clients,
                         ev.reason)
                self._relay.send(self._report("transferring"))
            elif isinstance(ev, ClientFinished) and ev.client_id in dropped and ev.outcome == "failed":
                # Dropped from the multicast, may fetch the rest over HTTP: its result comes later.
                log.info("client dropped to unicast deployment=%s client=%s: %s", job.deployment, ev.client_id,
                         ev.reason)
                with self._lock:
                    self._unicast[ev.client_id] = time.monotonic()
            elif isinstance(ev, ClientFinished):
                log.info("client %s deployment=%s client=%s %s", ev.outcome, job.deployment, ev.client_id,
                         ev.reason)
                self._relay.send(ClientResult(
                    deployment=job.deployment, session_id=job.session_id, dp=job.dp, client_id=ev.client_id,
                    outcome=ev.outcome, sha256=ev.sha256, reason=ev.reason[:500], bytes=ev.bytes,
                    seconds=round(ev.seconds, 6), address=ev.address[:128],
                    path=self._paths.get(ev.client_id, "multicast") if ev.outcome == "done" else "multicast",  # type: ignore[arg-type]
                ))
            elif isinstance(ev, ClientTooSlow):
                log.info("client moved to a slower tier deployment=%s client=%s receiving=%.1f Mbit/s",
                         job.deployment, ev.client_id, ev.recv_rate * 8 / 1e6)
            elif isinstance(ev, SessionFinished):
                log.info("session finished deployment=%s done=%d failed=%d reason=%s", job.deployment,
                         ev.clients_done, ev.clients_failed, ev.reason)
        for msg, addr in replies:
            self._reply(msg, addr)

    def _report(self, state: str, reason: str = "") -> SessionReport:
        s = self.sender.stats()
        return SessionReport(
            deployment=self.job.deployment, session_id=self.job.session_id, dp=self.job.dp, state=state,
            reason=reason[:500], clients_joined=int(s["clients_joined"]), clients_done=int(s["clients_done"]),
            clients_failed=int(s["clients_failed"]), bytes_sent=int(s["bytes_sent"]),
            seconds=round(time.monotonic() - self.opened_at, 3),
        )

    def final_report(self) -> SessionReport:
        return self._report("finished", self.sender.finish_reason)

    def _report_progress(self, now: float) -> None:
        with self._lock:
            per_client = {c.client_id: c.blocks_done for c in self.sender.clients.values()}
        self._relay.progress(self.job.deployment, per_client)
        self._relay.flush()
        if self._progress is not None:
            self._progress(self.stats())
