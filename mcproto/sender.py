"""Sans-I/O multicast sender for one session (the DP side of the session and data planes).

Pure: no sockets, no clock, no Celery.  Theory of operation (aioquic style):
inputs are ``handle_message(msg, address, now)`` for session-plane messages
and ``handle_timer(now)`` at ``get_timer()``; outputs are pulled with
``datagrams_to_send(now)`` (binary packets for the group), ``replies()``
(session-plane answers to unicast addresses) and ``next_event()``.

States::

    WAITING --(expected clients joined | start timeout with >=1 client)--> TRANSFERRING
    TRANSFERRING --(every joined client done/failed, and the join window closed)--> FINISHED
    any --(deadline)--> FINISHED

Reliability (this version): a carousel with NAK repair.  The first pass
sends every symbol once; receivers report missing ranges (``Status``), and
the sender queues each missing symbol at most once (``_pending`` dedups the
NAKs of all receivers), repairs before new data, and keeps serving late
joiners until they are complete.  Fountain coding replaces per-symbol repair
in a later version without changing this interface.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mcproto import packets
from mcproto.events import (
    ClientFinished,
    ClientJoined,
    SenderEvent,
    SessionFinished,
    TransferStarted,
)
from mcproto.messages import Ack, Done, Failed, Join, Message, NoSession, Offer, Status

WAITING = "WAITING"
TRANSFERRING = "TRANSFERRING"
FINISHED = "FINISHED"

ReadFn = Callable[[int, int], bytes]


@dataclass(frozen=True)
class SenderConfig:
    """Parameters of one session; times in seconds, rates in bytes per second."""

    session_id: int
    deployment: str
    group: str
    port: int
    image_size: int
    image_sha256: str
    symbol_size: int = packets.DEFAULT_SYMBOL_SIZE
    block_symbols: int = 512
    expected_clients: int = 0
    start_timeout: float = 60.0
    max_rate: float = 50e6
    feedback_interval: float = 0.05
    heartbeat_interval: float = 0.2
    client_timeout: float = 15.0
    deadline: float = 4 * 3600.0
    block_cache: int = 8

    @property
    def total_symbols(self) -> int:
        return math.ceil(self.image_size / self.symbol_size)


@dataclass
class ClientRecord:
    """What the sender knows of one client."""

    client_id: str
    address: str
    joined_at: float
    last_seen: float
    received: int = 0
    state: str = "joined"  # joined | done | failed
    reason: str = ""
    sha256: str | None = None
    seconds: float = 0.0
    addr: object = field(default=None, repr=False)


class Sender:
    """One multicast session's sender; see the module docstring for the protocol."""

    def __init__(self, config: SenderConfig, read: ReadFn, now: float) -> None:
        self.config = config
        self._read = read
        self.state = WAITING
        self.opened_at = now
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason = ""
        self.clients: dict[str, ClientRecord] = {}
        self._total = config.total_symbols
        self._bs = config.block_symbols
        self._ss = config.symbol_size
        self._cursor = 0
        self._pending = bytearray(self._total)
        self._repairs: deque[list[int]] = deque()  # [next, end) ranges of pending symbols
        self._tokens = 0.0
        self._burst = max(16 * (self._ss + packets.HEADER_SIZE), config.max_rate * 0.004)
        self._last_refill = now
        self._next_heartbeat = now
        self._finished_beacons = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._replies: list[tuple[bytes | Message, object]] = []
        self._events: deque[SenderEvent] = deque()
        self.bytes_sent = 0
        self.data_packets = 0
        self.repair_packets = 0
        self.rejected_messages = 0

    # ------------------------------------------------------------------ inputs

    def handle_message(self, msg: Message, addr: object, now: float) -> None:
        """A validated session-plane message from ``addr`` (opaque to us, echoed in replies)."""
        if isinstance(msg, Join):
            self._on_join(msg, addr, now)
            return
        client = self.clients.get(getattr(msg, "client_id", ""))
        if client is None or getattr(msg, "session_id", None) != self.config.session_id:
            self.rejected_messages += 1
            return
        client.last_seen = now
        client.addr = addr
        if isinstance(msg, Status):
            client.received = max(client.received, min(msg.received, self._total))
            if self.state == TRANSFERRING:
                for start, count in msg.missing:
                    self._queue_repair(start, start + count)
        elif isinstance(msg, Done):
            if client.state == "joined":
                if msg.sha256 == self.config.image_sha256 and msg.bytes == self.config.image_size:
                    self._finish_client(client, "done", "", msg.sha256, msg.seconds)
                else:
                    self._finish_client(client, "failed", "digest reported by client does not match the image",
                                        msg.sha256, msg.seconds)
            self._ack(client, addr)
        elif isinstance(msg, Failed):
            if client.state == "joined":
                self._finish_client(client, "failed", msg.reason, None, now - client.joined_at)
            self._ack(client, addr)
        self._check_progress(now)

    def handle_timer(self, now: float) -> None:
        """Housekeeping: start conditions, silent clients, end of session, deadline."""
        if self.state == FINISHED:
            return
        if now - self.opened_at >= self.config.deadline:
            self.abort("session deadline reached", now)
            return
        for c in self.clients.values():
            if c.state == "joined" and now - c.last_seen > self.config.client_timeout:
                self._finish_client(c, "failed", f"no feedback for {self.config.client_timeout:g} s",
                                    None, now - c.joined_at)
        self._check_progress(now)

    def abort(self, reason: str, now: float) -> None:
        """End the session now; every client still receiving is failed with ``reason``."""
        if self.state == FINISHED:
            return
        for c in self.clients.values():
            if c.state == "joined":
                self._finish_client(c, "failed", reason, None, now - c.joined_at)
        self._finish(now, reason)

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self, now: float, max_datagrams: int = 64) -> list[bytes]:
        """Data and heartbeat packets for the group, paced to ``max_rate``."""
        out: list[bytes] = []
        cfg = self.config
        if self.state == FINISHED:
            if self._finished_beacons < 3 and now >= self._next_heartbeat:
                self._finished_beacons += 1
                self._next_heartbeat = now + cfg.heartbeat_interval / 4
                out.append(self._heartbeat())
            return out
        if self.state == TRANSFERRING:
            self._tokens = min(self._burst, self._tokens + (now - self._last_refill) * cfg.max_rate)
            self._last_refill = now
            while self._tokens > 0 and len(out) < max_datagrams:
                index = self._next_index()
                if index is None:
                    break
                pkt = self._data_packet(index)
                out.append(pkt)
                self._tokens -= len(pkt)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + cfg.heartbeat_interval
            out.append(self._heartbeat())
        for pkt in out:
            self.bytes_sent += len(pkt)
        return out

    def replies(self) -> list[tuple[bytes | Message, object]]:
        """Session-plane answers as (message, address) pairs; clears the queue."""
        out, self._replies = self._replies, []
        return out

    def next_event(self) -> SenderEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        """When the adapter must call ``handle_timer``/``datagrams_to_send`` next."""
        t = self._next_heartbeat
        if self.state == TRANSFERRING and self.has_data_work:
            if self._tokens > 0:
                return self._last_refill
            t = min(t, self._last_refill + (-self._tokens + 1) / self.config.max_rate)
        elif self.state == FINISHED and self._finished_beacons >= 3:
            return math.inf
        return t

    @property
    def has_data_work(self) -> bool:
        return bool(self._repairs) or self._cursor < self._total

    def stats(self) -> dict[str, float | int | str]:
        """Plain numbers for progress reports (Flower, Redis, logs)."""
        done = sum(1 for c in self.clients.values() if c.state == "done")
        failed = sum(1 for c in self.clients.values() if c.state == "failed")
        return {
            "state": self.state,
            "clients_joined": len(self.clients),
            "clients_done": done,
            "clients_failed": failed,
            "bytes_sent": self.bytes_sent,
            "data_packets": self.data_packets,
            "repair_packets": self.repair_packets,
            "percent": round(100.0 * self._cursor / self._total, 1) if self._total else 100.0,
        }

    # ------------------------------------------------------------------ internals

    def _on_join(self, msg: Join, addr: object, now: float) -> None:
        cfg = self.config
        if msg.deployment is not None and msg.deployment != cfg.deployment:
            self._replies.append((NoSession(reason=f"this session is for deployment {cfg.deployment}"), addr))
            return
        if self.state == FINISHED:
            self._replies.append((NoSession(reason="the session has finished"), addr))
            return
        client = self.clients.get(msg.client_id)
        if client is None:
            client = ClientRecord(msg.client_id, str(addr), now, now, addr=addr)
            self.clients[msg.client_id] = client
            self._events.append(ClientJoined(msg.client_id, str(addr)))
        client.last_seen = now
        client.addr = addr
        self._replies.append((
            Offer(
                session_id=cfg.session_id, deployment=cfg.deployment, group=cfg.group, port=cfg.port,
                image_size=cfg.image_size, image_sha256=cfg.image_sha256, symbol_size=cfg.symbol_size,
                block_symbols=cfg.block_symbols,
                feedback_interval_ms=max(5, int(cfg.feedback_interval * 1000)),
            ),
            addr,
        ))
        self._check_progress(now)

    def _ack(self, client: ClientRecord, addr: object) -> None:
        outcome = "done" if client.state == "done" else "failed"
        self._replies.append((
            Ack(session_id=self.config.session_id, client_id=client.client_id, outcome=outcome,
                reason=client.reason[:500]),
            addr,
        ))

    def _finish_client(self, client: ClientRecord, outcome: str, reason: str, sha256: str | None,
                       seconds: float) -> None:
        client.state, client.reason, client.sha256, client.seconds = outcome, reason, sha256, seconds
        self._events.append(ClientFinished(
            client.client_id, outcome, reason, sha256,
            self.config.image_size if outcome == "done" else 0, seconds, client.address,
        ))

    def _check_progress(self, now: float) -> None:
        cfg = self.config
        joined = len(self.clients)
        if self.state == WAITING:
            enough = joined >= max(1, cfg.expected_clients)
            timed_out = joined >= 1 and now - self.opened_at >= cfg.start_timeout
            if enough or timed_out:
                self.state = TRANSFERRING
                self.started_at = now
                self._last_refill = now
                self._next_heartbeat = now
                reason = "expected clients joined" if enough else "start timeout"
                self._events.append(TransferStarted(reason, joined))
        if self.state == TRANSFERRING:
            active = [c for c in self.clients.values() if c.state == "joined"]
            window_closed = joined >= cfg.expected_clients or (
                self.started_at is not None and now - self.started_at >= cfg.start_timeout
            )
            if not active and window_closed:
                self._finish(now, "all clients accounted for")

    def _finish(self, now: float, reason: str) -> None:
        self.state = FINISHED
        self.finished_at = now
        self.finish_reason = reason
        self._next_heartbeat = now
        self._repairs.clear()
        done = sum(1 for c in self.clients.values() if c.state == "done")
        failed = sum(1 for c in self.clients.values() if c.state == "failed")
        self._events.append(SessionFinished(reason, done, failed))

    def _queue_repair(self, start: int, end: int) -> None:
        """Queue symbols [start, end) not yet queued; only what this pass already sent."""
        end = min(end, self._cursor)
        pending = self._pending
        pos = max(0, start)
        while pos < end:
            a = pending.find(0, pos, end)
            if a < 0:
                return
            b = pending.find(1, a, end)
            if b < 0:
                b = end
            pending[a:b] = b"\x01" * (b - a)
            self._repairs.append([a, b])
            pos = b

    def _next_index(self) -> int | None:
        while self._repairs:
            rng = self._repairs[0]
            i = rng[0]
            rng[0] += 1
            if rng[0] >= rng[1]:
                self._repairs.popleft()
            if self._pending[i]:
                self._pending[i] = 0
                self.repair_packets += 1
                return i
        if self._cursor < self._total:
            self._cursor += 1
            return self._cursor - 1
        return None

    def _data_packet(self, index: int) -> bytes:
        block, symbol = divmod(index, self._bs)
        data = self._blocks.get(block)
        if data is None:
            block_bytes = self._bs * self._ss
            data = self._read(block * block_bytes, block_bytes)
            self._blocks[block] = data
            if len(self._blocks) > self.config.block_cache:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(block)
        off = symbol * self._ss
        self.data_packets += 1
        return packets.encode_data(self.config.session_id, block, symbol,
                                   memoryview(data)[off:off + self._ss])

    def _heartbeat(self) -> bytes:
        flags = 0
        if self._cursor >= self._total:
            flags |= packets.HB_END_OF_PASS
        if self.state == FINISHED:
            flags |= packets.HB_FINISHED
        return packets.encode_heartbeat(self.config.session_id, self._total, self._cursor, flags)
