"""Speed tiers for one session (WDS "multistream"): slow clients move to a slower stream.

Pure: no sockets, no clock.  A :class:`TieredSession` runs one
:class:`~mcproto.sender.Sender` per tier, each on its own group and port at a
falling rate (e.g. 100 %, 1/3, 1/10 of the maximum).  Every client joins
tier 0.  A tier whose rate policy finds a client too slow lets it go with a
``ClientTooSlow`` event; the session then adopts the client in the next tier
and sends it a new ``Offer`` for that tier's group (same session id, same
image layout), so the client keeps every block it already has and receives
the rest at a pace it can take, while the faster tier is not held back.  The
last tier keeps its clients whatever their speed ("hold").

It offers the same interface as a single Sender (``handle_message``,
``handle_timer``, ``addressed_datagrams``, ``replies``, ``next_event``,
``get_timer``, ``stats``...), so the DP's session adapter drives either.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

from mcproto.events import ClientJoined, ClientTooSlow, SenderEvent, SessionFinished
from mcproto.messages import Join, Message
from mcproto.sender import FINISHED, TRANSFERRING, WAITING, ReadFn, Sender, SenderConfig, StartPolicy


class TieredSession:
    """Up to a few Senders of one image at falling rates; see the module docstring."""

    def __init__(self, config: SenderConfig, tiers: list[tuple[str, int, float]], read: ReadFn, now: float) -> None:
        """``tiers``: (group, port, max rate in bytes/s) per tier, fastest first; the first is ``config``'s."""
        if not tiers:
            raise ValueError("at least one tier")
        self.config = config
        self.senders: list[Sender] = []
        last = len(tiers) - 1
        for i, (group, port, rate) in enumerate(tiers):
            policy = replace(config.rate, slow_policy="tier" if i < last else "hold")
            cfg = replace(config, group=group, port=port, max_rate=rate, rate=policy,
                          # Slower tiers never end by themselves: the session ends them with tier 0.
                          expected_clients=config.expected_clients if i == 0 else 2**31,
                          start=config.start if i == 0 else StartPolicy(clients=1))
            self.senders.append(Sender(cfg, read, now))
        self.tier_of: dict[str, int] = {}
        self._joins: dict[str, Join] = {}
        self._events: deque[SenderEvent] = deque()
        self.finished_at: float | None = None
        self.finish_reason = ""
        self.moves = 0

    # ------------------------------------------------------------------ the Sender-like interface

    @property
    def state(self) -> str:
        if self.finished_at is not None:
            return FINISHED
        return TRANSFERRING if any(s.state == TRANSFERRING for s in self.senders) else WAITING

    @property
    def clients(self) -> dict:
        out: dict = {}
        for s in self.senders:
            out.update({cid: c for cid, c in s.clients.items() if self.tier_of.get(cid) == self.senders.index(s)})
        return out

    @property
    def started_at(self) -> float | None:
        return self.senders[0].started_at

    @property
    def rate(self) -> float:
        return self.senders[0].rate

    def handle_message(self, msg: Message, addr: object, now: float) -> None:
        cid = getattr(msg, "client_id", "")
        tier = self.tier_of.get(cid, 0)
        if isinstance(msg, Join):
            self._joins[cid] = msg  # replayed to the next tier on a move (it carries the client's key)
            if cid not in self.tier_of:
                self.tier_of[cid] = 0
        self.senders[tier].handle_message(msg, addr, now)
        self._collect(now)

    def handle_timer(self, now: float) -> None:
        for s in self.senders:
            s.handle_timer(now)
        self._collect(now)

    def abort(self, reason: str, now: float) -> None:
        for s in self.senders:
            s.abort(reason, now)
        self._collect(now)

    def addressed_datagrams(self, now: float, max_datagrams: int = 64) -> list[tuple[bytes, tuple[str, int]]]:
        out: list[tuple[bytes, tuple[str, int]]] = []
        for s in self.senders:
            if s.state == WAITING and not s.clients:
                continue  # an empty slower tier stays silent until someone moves in
            out.extend(s.addressed_datagrams(now, max(1, max_datagrams - len(out))))
        return out

    def replies(self) -> list[tuple[Message, object]]:
        out: list[tuple[Message, object]] = []
        for s in self.senders:
            out.extend(s.replies())
        return out

    def next_event(self) -> SenderEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        times = [s.get_timer() for s in self.senders if not (s.state == WAITING and not s.clients)]
        return min(times, default=math.inf)

    def stats(self) -> dict[str, float | int | str]:
        per = [s.stats() for s in self.senders]
        out = dict(per[0])
        for key in ("bytes_sent", "source_symbols", "repair_symbols", "catchup_symbols", "clients_done",
                    "clients_failed"):
            out[key] = sum(int(p[key]) for p in per)
        out["state"] = self.state
        out["clients_joined"] = len(self.tier_of)
        out["tiers"] = len(self.senders)
        out["moves"] = self.moves
        return out

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    # ------------------------------------------------------------------ internals

    def _collect(self, now: float) -> None:
        for i, s in enumerate(self.senders):
            while (ev := s.next_event()) is not None:
                if isinstance(ev, ClientTooSlow) and i + 1 < len(self.senders):
                    self._move(ev.client_id, i, now)
                    self._events.append(ev)  # for the adapter's log
                elif isinstance(ev, SessionFinished):
                    continue  # the tiered session finishes as a whole, below
                elif isinstance(ev, ClientJoined) and i > 0:
                    continue  # a move, not a new client
                else:
                    self._events.append(ev)
        if self.finished_at is None and self._all_done():
            self.finished_at = now
            done = sum(int(s.stats()["clients_done"]) for s in self.senders)
            failed = sum(int(s.stats()["clients_failed"]) for s in self.senders)
            self.finish_reason = self.senders[0].finish_reason or "all clients accounted for"
            for s in self.senders[1:]:
                if s.state != FINISHED:
                    s.abort(self.finish_reason, now)
                    while s.next_event() is not None:
                        pass
            self._events.append(SessionFinished(self.finish_reason, done, failed))

    def _all_done(self) -> bool:
        if self.senders[0].state != FINISHED:
            return False
        return all(s.state == FINISHED or not any(c.state in ("joined", "moved") and self.tier_of.get(c.client_id)
                                                  == i + 1 for c in s.clients.values())
                   for i, s in enumerate(self.senders[1:]))

    def _move(self, client_id: str, tier: int, now: float) -> None:
        src = self.senders[tier].clients[client_id]
        self.tier_of[client_id] = tier + 1
        self.moves += 1
        # Joining the next tier replies with that tier's Offer: the client switches groups.
        join = self._joins.get(client_id) or Join(client_id=client_id)
        self.senders[tier + 1].handle_message(join.model_copy(update={"deployment": None}), src.addr, now)
