"""Sans-I/O multicast sender for one session (the DP side of the session and data planes).

Pure: no sockets, no clock, no Celery.  Theory of operation (aioquic style):
inputs are ``handle_message(msg, address, now)`` for session-plane messages
and ``handle_timer(now)`` at ``get_timer()``; outputs are pulled with
``datagrams_to_send(now)`` (binary packets for the group), ``replies()``
(session-plane answers to unicast addresses) and ``next_event()``.

States::

    WAITING --(start policy: at once | N joined | delay | time; first wins)--> TRANSFERRING
    TRANSFERRING --(every joined client done/failed, and the join window closed)--> FINISHED
    any --(deadline | abort)--> FINISHED

Transport: a fountain-style carousel over Reed-Solomon blocks
(:mod:`mcproto.fec`: zfec "rs" or the wide GF(2^16) "rs16", k up to 32,768).
The first pass sends each block's k source symbols plus ``r`` proactive repair
symbols, r sized from the worst loss receivers report.  Receivers answer
"block b: m more symbols"; the sender keeps, per block, the *maximum* m over
receivers (one repair symbol fixes different losses at different receivers),
minus repairs it sent so recently that the reporter cannot have counted them, and sends fresh repair symbols before new
data.  A receiver that needs a whole block (it joined late) is served after
the first pass, from the source symbols: a late joiner at 50 % finishes one
partial pass later, not one full pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from mcproto import packets
from mcproto.events import (
    ClientFinished,
    ClientJoined,
    ClientTooSlow,
    SenderEvent,
    SessionFinished,
    TransferStarted,
)
from mcproto.fec import DEFAULT_FEC, DEFAULT_K, FecName, Layout, codec_for, layout_for, split_block
from mcproto.messages import Ack, Done, Drop, Failed, Join, Message, NoSession, Offer, Status
from mcproto.policy import RatePolicy, StartPolicy
from mcproto.seal import PacketSealer

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
    block_symbols: int = DEFAULT_K[DEFAULT_FEC]
    fec: FecName = DEFAULT_FEC  # "rs" (zfec, k <= 255) or "rs16" (GF(2^16), k <= 32,768); see mcproto.fec
    repair_symbols: int = 0  # rs16: repair ids per block, R (0: mcproto.fec_wide.default_repair(k)); rs: 0
    expected_clients: int = 0
    start: StartPolicy = field(default_factory=StartPolicy)
    rate: RatePolicy = field(default_factory=RatePolicy)
    join_window: float = 60.0  # after the start, wait this long for expected clients still missing
    max_rate: float = 50e6
    proactive_min: float = 0.01  # proactive repair per block, as a fraction of k, at least
    proactive_max: float = 0.25
    feedback_interval: float = 0.05
    inflight_window: float = 0.02  # repairs younger than this (~2 RTT + queueing) may not have reached a reporter
    heartbeat_interval: float = 0.2
    announce: bytes = b""  # an encoded Announce to repeat on the group (empty: none)
    key: bytes | None = None  # session key: packets are sealed (format v2, ChaCha20-Poly1305); None: v1 CRC
    epoch: int = 0  # nonce epoch of this sender instance: unique per key (the lease's fencing number)
    # Announces sealed too (pre-shared keys: receivers hold the key) or in the clear (DP sessions: clients get
    # the key only after joining, and the announce says nothing secret, just where to join).
    seal_announce: bool = True
    # Completes each client's Offer (wrapped session key, DP signature) or refuses with a NoSession.
    offer_hook: Callable[[Offer, Join], Offer | NoSession] | None = None
    announce_interval: float = 0.5
    client_timeout: float = 15.0
    deadline: float = 4 * 3600.0
    block_cache: int = 0  # source blocks kept in memory for repairs (0: about 16 MiB worth, at least 8)

    @property
    def layout(self) -> Layout:
        return layout_for(self.fec, self.image_size, self.symbol_size, self.block_symbols, self.repair_symbols)


@dataclass
class ClientRecord:
    """What the sender knows of one client."""

    client_id: str
    address: str
    joined_at: float
    last_seen: float
    blocks_done: int = 0
    loss: float = 0.0
    recv_rate: float | None = None  # bytes/s of data arriving at the client, as it reports
    slow_since: float | None = None
    rate_fresh: bool = False  # a receive rate arrived since the last rate check
    moved_at: float = -math.inf
    state: str = "joined"  # joined | done | failed | moved
    refused: bool = False  # it refused our offer: failed, and not one of the clients the session waits for
    reason: str = ""
    sha256: str | None = None
    seconds: float = 0.0
    addr: object = field(default=None, repr=False)


class Sender:
    """One multicast session's sender; see the module docstring for the protocol."""

    def __init__(self, config: SenderConfig, read: ReadFn, now: float) -> None:
        self.config = config
        self.layout = config.layout
        self._read = read
        self._codec = codec_for(self.layout)
        self._block_cache = config.block_cache or max(8, (16 << 20) // max(1, self.layout.block_bytes))
        self._sealer = PacketSealer(config.key, config.epoch) if config.key else None
        self.state = WAITING
        self.opened_at = now
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason = ""
        self.clients: dict[str, ClientRecord] = {}
        self._nblocks = self.layout.blocks
        # First pass: block cursor and the queue of (block, esi) still to send for the current block.
        self._cursor = 0
        self._current: deque[tuple[int, int]] = deque()
        # Repairs: block -> symbols still owed (max over receivers); dict order = service order.
        self._repairs: dict[int, int] = {}
        self._catchup: dict[int, int] = {}  # whole blocks for late joiners, after the first pass
        self._catchup_esi: dict[int, int] = {}  # where each block's catch-up continues (ids cycle 0..n_max-1)
        self._catchup_for: dict[int, set[str]] = {}  # who asked for each catch-up (dropped when they leave)
        self._next_esi: dict[int, int] = {}  # next fresh repair symbol id per block
        self._recent: dict[int, tuple[float, int]] = {}  # block -> (time of last repair, count in window)
        self.rate = config.max_rate  # current send rate, bytes/s (adaptive)
        self._over_ceiling = 0  # consecutive rate checks with the worst loss above the ceiling
        self._next_rate_check = now
        self._tokens = 0.0
        self._burst = max(16 * (config.symbol_size + packets.HEADER_SIZE), config.max_rate * 0.004)
        self._last_refill = now
        self._next_heartbeat = now
        self._finished_beacons = 0
        self._pass_announced = False
        self._next_announce = now
        self._blocks: OrderedDict[int, list[bytes]] = OrderedDict()
        self._replies: list[tuple[Message, object]] = []
        self._events: deque[SenderEvent] = deque()
        self.bytes_sent = 0
        self.source_symbols = 0
        self.repair_symbols = 0
        self.catchup_symbols = 0
        self.rejected_messages = 0
        self._refused = 0  # clients that refused our offer (kept as a count: _check_progress runs per message)

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
            client.blocks_done = max(client.blocks_done, min(msg.blocks_done, self._nblocks))
            client.loss = msg.loss_permille / 1000.0
            if msg.recv_kbps is not None:
                client.recv_rate = msg.recv_kbps * 1000 / 8
                client.rate_fresh = True
            if self.state == TRANSFERRING and client.state == "joined":
                for first, count, need in msg.needs:
                    self._on_need(first, count, need, now, client.client_id)
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
                client.refused = msg.refused
                self._refused += msg.refused
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
        if self.state == TRANSFERRING and now >= self._next_rate_check:
            self._next_rate_check = now + self.config.rate.interval
            self._adapt_rate(now)
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
            self._tokens = min(self._burst, self._tokens + (now - self._last_refill) * self.rate)
            self._last_refill = now
            pkt_size = cfg.symbol_size + packets.HEADER_SIZE
            while self._tokens > 0 and len(out) < max_datagrams:
                batch = self._next_symbols(now, min(max_datagrams - len(out), math.ceil(self._tokens / pkt_size)))
                if not batch:
                    break
                for pkt in batch:
                    out.append(pkt)
                    self._tokens -= len(pkt)
        if not self._pass_announced and self._cursor >= self._nblocks and not self._current:
            self._pass_announced = True  # tell receivers at once, so they ask for the tail
            self._next_heartbeat = now
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + cfg.heartbeat_interval
            out.append(self._heartbeat())
        if cfg.announce and now >= self._next_announce:
            self._next_announce = now + cfg.announce_interval
            out.append(self._seal(packets.KIND_ANNOUNCE, 0, 0, cfg.announce) if self._sealer and cfg.seal_announce
                       else packets.encode_announce(cfg.session_id, cfg.announce))
        for pkt in out:
            self.bytes_sent += len(pkt)
        return out

    def addressed_datagrams(self, now: float, max_datagrams: int = 64) -> list[tuple[bytes, tuple[str, int]]]:
        """``datagrams_to_send`` with each packet's destination group (one interface for tiers too)."""
        dest = (self.config.group, self.config.port)
        return [(pkt, dest) for pkt in self.datagrams_to_send(now, max_datagrams)]

    def replies(self) -> list[tuple[Message, object]]:
        """Session-plane answers as (message, address) pairs; clears the queue."""
        out, self._replies = self._replies, []
        return out

    def next_event(self) -> SenderEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        """When the adapter must call ``handle_timer``/``datagrams_to_send`` next."""
        t = self._next_heartbeat
        if self.config.announce and self.state != FINISHED:
            t = min(t, self._next_announce)
        if self.state == WAITING and self.clients:
            # A start deadline matters only once someone is there to start for (else a past
            # deadline would make the adapter spin).
            t = min(t, self.config.start.next_deadline(self.opened_at))
        elif self.state == TRANSFERRING and self.has_data_work:
            if self._tokens > 0:
                return self._last_refill
            t = min(t, self._last_refill + (-self._tokens + 1) / self.rate)
        elif self.state == FINISHED and self._finished_beacons >= 3:
            return math.inf
        return t

    @property
    def has_data_work(self) -> bool:
        return bool(self._current or self._repairs or self._catchup) or self._cursor < self._nblocks

    @property
    def proactive_ratio(self) -> float:
        """Proactive repair per block, from the worst recent loss of the clients that count.

        A client about to be dropped as too slow does not count: its losses are its own.
        """
        worst = max((c.loss for c in self.clients.values() if c.state == "joined" and c.slow_since is None),
                    default=0.0)
        # p/(1-p) more symbols make k arrive on average at loss p.
        return min(self.config.proactive_max, max(self.config.proactive_min, worst / max(1e-9, 1 - worst)))

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
            "source_symbols": self.source_symbols,
            "repair_symbols": self.repair_symbols,
            "catchup_symbols": self.catchup_symbols,
            "percent": round(100.0 * self._cursor / self._nblocks, 1) if self._nblocks else 100.0,
            "send_rate_mbps": round(self.rate * 8 / 1e6, 1),
        }

    # ------------------------------------------------------------------ session plane

    def _on_join(self, msg: Join, addr: object, now: float) -> None:
        cfg = self.config
        if msg.deployment is not None and msg.deployment != cfg.deployment:
            self._replies.append((NoSession(reason=f"this session is for deployment {cfg.deployment}"), addr))
            return
        if self.state == FINISHED:
            self._replies.append((NoSession(reason="the session has finished"), addr))
            return
        plain = Offer(
            session_id=cfg.session_id, deployment=cfg.deployment, group=cfg.group, port=cfg.port,
            image_size=cfg.image_size, image_sha256=cfg.image_sha256, symbol_size=cfg.symbol_size,
            block_symbols=cfg.block_symbols, fec=self.layout.fec, repair_symbols=self.layout.repair_ids,
            feedback_interval_ms=max(5, int(cfg.feedback_interval * 1000)),
        )
        # The adapter adds the wrapped key and signature (or refuses the client).
        offer = cfg.offer_hook(plain, msg) if cfg.offer_hook is not None else plain
        if isinstance(offer, NoSession):
            self._replies.append((offer, addr))
            return
        client = self.clients.get(msg.client_id)
        if client is None:
            client = ClientRecord(msg.client_id, str(addr), now, now, addr=addr)
            self.clients[msg.client_id] = client
            self._events.append(ClientJoined(msg.client_id, str(addr)))
        client.last_seen = now
        client.addr = addr
        self._replies.append((offer, addr))
        self._check_progress(now)

    def _ack(self, client: ClientRecord, addr: object) -> None:
        outcome: Literal["done", "failed"] = "done" if client.state == "done" else "failed"
        self._replies.append((
            Ack(session_id=self.config.session_id, client_id=client.client_id, outcome=outcome,
                reason=client.reason[:500]),
            addr,
        ))

    def _finish_client(self, client: ClientRecord, outcome: str, reason: str, sha256: str | None,
                       seconds: float) -> None:
        client.state, client.reason, client.sha256, client.seconds = outcome, reason, sha256, seconds
        self._forget_requests(client.client_id)
        self._events.append(ClientFinished(
            client.client_id, outcome, reason, sha256,
            self.config.image_size if outcome == "done" else 0, seconds, client.address,
        ))

    def _forget_requests(self, client_id: str) -> None:
        """A client left (finished, dropped, moved): stop resending whole blocks only it needed."""
        for b in [b for b, who in self._catchup_for.items() if client_id in who]:
            who = self._catchup_for[b]
            who.discard(client_id)
            if not who:
                del self._catchup_for[b]
                self._catchup.pop(b, None)

    def _check_progress(self, now: float) -> None:
        cfg = self.config
        joined = len(self.clients) - self._refused  # a client that refused our offer does not count
        if self.state == WAITING:
            reason = cfg.start.due(joined, self.opened_at, now)
            if reason:
                self.state = TRANSFERRING
                self.started_at = now
                self._last_refill = now
                self._next_heartbeat = now
                self._events.append(TransferStarted(reason, joined))
        if self.state == TRANSFERRING:
            # A client just moved to another tier may still listen here until its new offer lands:
            # do not wave it off with FINISHED heartbeats for a moment.
            active = any(c.state == "joined" or (c.state == "moved" and now - c.moved_at < 1.0)
                         for c in self.clients.values())
            window_closed = joined >= cfg.expected_clients or (
                self.started_at is not None and now - self.started_at >= cfg.join_window
            )
            if not active and window_closed:
                self._finish(now, "all clients accounted for")

    def _finish(self, now: float, reason: str) -> None:
        self.state = FINISHED
        self.finished_at = now
        self.finish_reason = reason
        self._next_heartbeat = now
        self._repairs.clear()
        self._catchup.clear()
        self._current.clear()
        done = sum(1 for c in self.clients.values() if c.state == "done")
        failed = sum(1 for c in self.clients.values() if c.state == "failed")
        self._events.append(SessionFinished(reason, done, failed))

    # ------------------------------------------------------------------ rate and slow clients

    def _adapt_rate(self, now: float) -> None:
        pol = self.config.rate
        counted = []
        for c in self.clients.values():
            if c.state != "joined":
                continue
            if not c.rate_fresh and c.slow_since is not None:
                continue  # no new measurement: neither condemn nor clear it on an old one
            c.rate_fresh = False
            slow = (pol.slow_policy in ("drop", "tier") and c.recv_rate is not None
                    and c.recv_rate < min(pol.drop_below, 0.5 * self.rate))
            if slow:
                if c.slow_since is None:
                    c.slow_since = now
                elif now - c.slow_since >= pol.slow_grace:
                    if pol.slow_policy == "tier":
                        c.state = "moved"
                        c.moved_at = now
                        self._forget_requests(c.client_id)
                        self._events.append(ClientTooSlow(c.client_id, c.recv_rate or 0.0))
                    else:
                        self._drop(c, now)
                continue  # a client being dropped or moved does not slow the others
            c.slow_since = None
            counted.append(c)
        if not pol.adaptive or not counted:
            return
        worst = max(c.loss for c in counted)
        floor = max(pol.min_rate, pol.drop_below if pol.slow_policy in ("drop", "tier") else 0.0)
        # Act on a sustained signal only: with hundreds of receivers the worst of their noisy
        # estimates crosses the ceiling now and then without any congestion.
        self._over_ceiling = self._over_ceiling + 1 if worst > pol.loss_ceiling else 0
        if self._over_ceiling >= 2:
            self.rate = max(min(floor, self.config.max_rate), self.rate * pol.decrease)
        elif worst < pol.loss_ceiling / 2:
            self.rate = min(self.config.max_rate, self.rate + pol.increase * self.config.max_rate)

    def _drop(self, client: ClientRecord, now: float) -> None:
        pol = self.config.rate
        rate = (client.recv_rate or 0.0) * 8 / 1e6
        reason = (f"too slow for this session: receiving {rate:.1f} Mbit/s, below the minimum "
                  f"{pol.drop_below * 8 / 1e6:.1f} Mbit/s")
        self._replies.append((Drop(session_id=self.config.session_id, client_id=client.client_id,
                                   reason=reason, unicast_allowed=pol.unicast_fallback), client.addr))
        self._finish_client(client, "failed", reason, None, now - client.joined_at)

    # ------------------------------------------------------------------ repair bookkeeping

    def _on_need(self, first: int, count: int, need: int, now: float, client_id: str = "") -> None:
        """A receiver needs ``need`` more symbols in each of ``count`` blocks from ``first``."""
        # Only blocks whose first pass is over: the block being sent still has symbols coming.
        passed = self._cursor - (1 if self._current else 0)
        last = min(first + count, passed, self._nblocks)
        for b in range(max(0, first), last):
            k = self.layout.block_k(b)
            m = min(need, k)
            t, recent = self._recent.get(b, (-math.inf, 0))
            if now - t < self.config.inflight_window:
                m -= recent  # repairs or catch-up sent so recently they cannot have been counted yet
            queued = self._catchup.get(b, 0)
            if queued:  # a catch-up of this block is under way: what it still sends counts too
                if m > queued:
                    self._catchup[b] = m
                self._catchup_for.setdefault(b, set()).add(client_id)
                continue
            if m <= 0:
                continue
            if 2 * m > k:
                # Most of the block is missing (a late join, a blackout): resend it after the first
                # pass, source symbols first.  They are new to such a receiver, whereas cycling through
                # repair ids it may already hold (there are only n_max - k) could take many rounds.
                # A repeated request never restarts a catch-up under way: it continues from its id.
                self._catchup[b] = max(self._catchup.get(b, 0), m)
                self._catchup_for.setdefault(b, set()).add(client_id)
                continue
            if m > self._repairs.get(b, 0):
                self._repairs[b] = m

    def _next_symbols(self, now: float, limit: int) -> list[bytes]:
        """The next packets: the rest of the block under way, repairs, new blocks, then catch-up.

        A block's first pass is never interrupted: receivers take a change of block as "the
        sender moved on" and would ask for symbols still to come (and see false loss).
        """
        if self._repairs and not self._current:
            b = next(iter(self._repairs))
            m = self._repairs.pop(b)
            n = min(m, limit)
            if n < m:
                self._repairs[b] = m - n
            pkts = self._repair_packets(b, n)
            self._note_sent(b, n, now)
            self.repair_symbols += len(pkts)
            return pkts
        if not self._current and self._cursor < self._nblocks:
            b = self._cursor
            self._cursor += 1
            k = self.layout.block_k(b)
            n_max = self.layout.n_max(b)
            r = min(n_max - k, math.ceil(k * self.proactive_ratio))
            self._current.extend((b, esi) for esi in range(k + r))
            self._next_esi[b] = k + r if k + r < n_max else k
        if self._current:
            out: list[bytes] = []
            while self._current and len(out) < limit:
                b, esi = self._current.popleft()
                if esi < self.layout.block_k(b):
                    out.append(self._packet(b, esi, self._source(b)[esi]))
                    self.source_symbols += 1
                else:
                    # Proactive repairs of the block just sent: generate them together.
                    esis = [esi]
                    while self._current and self._current[0][0] == b and len(esis) < limit - len(out):
                        esis.append(self._current.popleft()[1])
                    syms = self._codec.repair(self._source(b), esis)
                    out.extend(self._packet(b, e, s) for e, s in zip(esis, syms, strict=True))
                    self.repair_symbols += len(esis)
            return out
        if self._catchup:
            b = next(iter(self._catchup))
            m = self._catchup.pop(b)
            n = min(m, limit)
            if n < m:
                self._catchup[b] = m - n
            else:
                self._catchup_for.pop(b, None)
            k = self.layout.block_k(b)
            n_max = self.layout.n_max(b)
            start = self._catchup_esi.get(b, 0)
            esis = [(start + i) % n_max for i in range(n)]
            self._catchup_esi[b] = (start + n) % n_max
            src = self._source(b)
            repair_esis = [e for e in esis if e >= k]
            repairs = dict(zip(repair_esis, self._codec.repair(src, repair_esis), strict=True)) if repair_esis else {}
            self.catchup_symbols += n
            self._note_sent(b, n, now)
            return [self._packet(b, e, src[e] if e < k else repairs[e]) for e in esis]
        return []

    def _note_sent(self, b: int, n: int, now: float) -> None:
        """Remember symbols just sent for ``b`` beyond its first pass (subtracted from needs reported
        before they can have arrived)."""
        t, recent = self._recent.get(b, (-math.inf, 0))
        self._recent[b] = (now, n + (recent if now - t < self.config.inflight_window else 0))
        if len(self._recent) > 4096:
            self._recent = {blk: v for blk, v in self._recent.items() if now - v[0] < self.config.inflight_window}

    def _repair_packets(self, b: int, n: int) -> list[bytes]:
        k = self.layout.block_k(b)
        n_max = self.layout.n_max(b)
        esis = []
        esi = self._next_esi.get(b, k)
        for _ in range(n):
            esis.append(esi)
            esi = (esi + 1) % n_max  # all n_max - k repair ids used: cycle through every id, source first
        self._next_esi[b] = esi
        src = self._source(b)
        repair_esis = [e for e in esis if e >= k]
        repairs = dict(zip(repair_esis, self._codec.repair(src, repair_esis), strict=True)) if repair_esis else {}
        return [self._packet(b, e, src[e] if e < k else repairs[e]) for e in esis]

    def _source(self, b: int) -> list[bytes]:
        syms = self._blocks.get(b)
        if syms is None:
            k = self.layout.block_k(b)
            data = self._read(self.layout.block_offset(b), self.layout.block_len(b))
            syms = split_block(data, k, self.config.symbol_size)
            self._blocks[b] = syms
            if len(self._blocks) > self._block_cache:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(b)
        return syms

    def _packet(self, block: int, esi: int, payload: bytes) -> bytes:
        if self._sealer:
            return self._seal(packets.KIND_DATA, block, esi, payload)
        return packets.encode_data(self.config.session_id, block, esi, payload)

    def _seal(self, kind: int, block: int, esi: int, payload: bytes) -> bytes:
        assert self._sealer is not None
        return self._sealer.seal(kind, self.config.session_id, block, esi, payload)

    def _heartbeat(self) -> bytes:
        flags = 0
        if self._cursor >= self._nblocks and not self._current:
            flags |= packets.HB_END_OF_PASS
        if self.state == FINISHED:
            flags |= packets.HB_FINISHED
        sent_through = self._cursor - (1 if self._current else 0)
        feedback_ms = round(self.feedback_interval * 1000)
        if self._sealer:
            return self._seal(packets.KIND_HEARTBEAT, 0, 0,
                              packets.HEARTBEAT_BODY.pack(self._nblocks, sent_through, flags, min(65535, feedback_ms)))
        return packets.encode_heartbeat(self.config.session_id, self._nblocks, sent_through, flags, feedback_ms)

    @property
    def feedback_interval(self) -> float:
        """How often each receiver reports: the configured pace, spread out as the group grows.

        At 50 ms and 1,000 receivers the DP would field 20,000 reports a second; one report per
        250 receivers per 50 ms keeps it near 5,000 (repairs aggregate by max, so little is lost).
        """
        return min(1.0, self.config.feedback_interval * max(1.0, len(self.clients) / 250))
