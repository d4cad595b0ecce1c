"""In-memory harness for the sans-I/O sender and receivers: a virtual clock and a lossy link.

Pure test helper (no sockets): datagrams move between objects in memory, so a
run is deterministic for a given seed and takes no wall-clock time.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from mcproto import codec
from mcproto.errors import PacketError
from mcproto.events import Acknowledged, GaveUp, Moved, TransferComplete
from mcproto.messages import Join, Offer
from mcproto.receiver import Receiver
from mcproto.sender import FINISHED, Sender, SenderConfig, StartPolicy
from mcproto.tiers import TieredSession

LossFn = Callable[[random.Random], bool]


@dataclass
class VirtualClient:
    client_id: str
    loss: float
    join_at: float = 0.0
    receiver: Receiver | None = None
    out: bytearray = field(default_factory=bytearray)
    outcome: str = ""
    finished_at: float = 0.0
    dropped: int = 0
    max_partial: int = 0
    capacity: float = 0.0  # bytes/s this receiver can take in (0: unlimited), like a slow CPU
    buffer: int = 256 * 1024  # its socket buffer: arrivals beyond it are lost
    group: tuple[str, int] = ("", 0)
    moves: int = 0
    rejected: int = 0
    _queue: float = 0.0
    _drained_at: float = 0.0

    def lose(self, rng: random.Random) -> bool:
        return rng.random() < self.loss

    def overflows(self, now: float, size: int) -> bool:
        """The receiver's socket buffer is full (it drains at ``capacity``)."""
        if not self.capacity:
            return False
        self._queue = max(0.0, self._queue - (now - self._drained_at) * self.capacity)
        self._drained_at = now
        if self._queue + size > self.buffer:
            return True
        self._queue += size
        return False


def run_session(image: bytes, clients: list[VirtualClient], *, seed: int = 1, step: float = 0.001,
                max_time: float = 120.0, config: dict | None = None,
                start: StartPolicy | None = None, tiers: list[tuple[str, int, float]] | None = None,
                key: bytes | None = None, forge: Callable[[bytes], bytes] | None = None,
                ) -> tuple[Sender, float]:
    """Drive one session to its end on a virtual clock; returns the sender (or tiered session) and the end time.

    Packets reach only the clients listening on their group, as on a real network.
    """
    rng = random.Random(seed)
    now = 0.0
    cfg = SenderConfig(session_id=7, deployment="dep-1", group="239.255.0.1", port=5000,
                       image_size=len(image), image_sha256=hashlib.sha256(image).hexdigest(),
                       start=start or StartPolicy(), key=key, **(config or {}))
    def read(off: int, n: int) -> bytes:
        return image[off:off + n]

    sender = TieredSession(cfg, tiers, read, now) if tiers else Sender(cfg, read, now)
    sha = hashlib.sha256(image).hexdigest()
    by_id = {c.client_id: c for c in clients}
    for c in clients:
        c.out = bytearray(len(image))
    while now < max_time:
        for c in clients:
            if c.receiver is None and now >= c.join_at:
                join = codec.decode(codec.encode(Join(client_id=c.client_id)))
                sender.handle_message(join, c.client_id, now)
        for msg, addr in sender.replies():
            c = by_id[addr]  # type: ignore[index]
            wire = codec.decode(codec.encode(msg))
            if isinstance(wire, Offer) and c.receiver is None:
                c.receiver = Receiver(wire, c.client_id, now, key=key)
                c.group = (wire.group, wire.port)
            elif c.receiver is not None:
                c.receiver.handle_message(wire, now)
        sender.handle_timer(now)
        sent = sender.addressed_datagrams(now, max_datagrams=256)
        if forge is not None:  # an attacker on the group adds a forged packet for every real one
            sent = [x for pkt, dest in sent for x in ((pkt, dest), (forge(pkt), dest))]
        for pkt, dest in sent:
            for c in clients:
                r = c.receiver
                if r is None or r.done or c.group != dest:
                    continue
                if c.lose(rng) or c.overflows(now, len(pkt)):
                    c.dropped += 1
                    continue
                try:
                    w = r.receive_datagram(pkt, now)
                except PacketError:
                    c.rejected += 1
                    continue
                if w is not None:
                    off, data = w
                    c.out[off:off + len(data)] = data
        for c in clients:
            r = c.receiver
            if r is None:
                continue
            c.max_partial = max(c.max_partial, len(r._partial))
            r.handle_timer(now)
            while (ev := r.next_event()) is not None:
                if isinstance(ev, TransferComplete):
                    digest = hashlib.sha256(c.out).hexdigest()
                    if digest == sha:
                        r.verified(digest, len(c.out), now, now)
                    else:
                        r.fail("digest mismatch", now)
                elif isinstance(ev, Acknowledged):
                    c.outcome, c.finished_at = ev.outcome, now
                elif isinstance(ev, GaveUp):
                    c.outcome, c.finished_at = "gave up: " + ev.reason, now
                elif isinstance(ev, Moved):
                    c.group = (ev.group, ev.port)
                    c.moves += 1
            for msg in r.datagrams_to_send(now):
                if c.lose(rng):  # feedback is lossy too
                    continue
                sender.handle_message(codec.decode(codec.encode(msg)), c.client_id, now)
        if sender.state == FINISHED and all(c.receiver is None or c.receiver.done for c in clients):
            break
        now += step
    return sender, now
