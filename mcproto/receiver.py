"""Sans-I/O multicast receiver for one session (the client side).

Pure: no sockets, no clock, no file I/O.  Inputs: ``receive_datagram(data,
now)`` for packets from the group, ``handle_message(msg, now)`` for
session-plane answers from the DP, ``handle_timer(now)`` at ``get_timer()``,
and the adapter's verdict on the written output (``verified``/``fail``).
Outputs: ``receive_datagram`` returns ``(offset, payload)`` to write, or None;
``datagrams_to_send(now)`` returns session-plane messages for the DP;
``next_event()`` returns ``TransferComplete``, ``Acknowledged`` or ``GaveUp``.

States::

    RECEIVING --(all symbols in)--> COMPLETE --(adapter verified / failed)--> REPORTING
    REPORTING --(Ack from DP)--> ACKED
    any --(sender silent, session over, no ack)--> GAVE_UP

Feedback: every ``feedback_interval`` the receiver reports the gaps it has
not reported yet (below the highest symbol the sender has reached); gaps
still open are re-reported after ``rescan_interval``.  At most
``MAX_RANGES_PER_STATUS`` ranges per message keep a datagram small.
"""

from __future__ import annotations

import math
from collections import deque

from mcproto import packets
from mcproto.errors import PacketError
from mcproto.events import Acknowledged, GaveUp, ReceiverEvent, TransferComplete
from mcproto.messages import MAX_RANGES_PER_STATUS, Ack, Done, Failed, Message, Offer, Status

RECEIVING = "RECEIVING"
COMPLETE = "COMPLETE"
REPORTING = "REPORTING"
ACKED = "ACKED"
GAVE_UP = "GAVE_UP"


class Receiver:
    """One client's receive state for one session."""

    def __init__(
        self,
        offer: Offer,
        client_id: str,
        now: float,
        *,
        rescan_interval: float = 0.25,
        keepalive_interval: float = 0.5,
        idle_timeout: float = 30.0,
        report_timeout: float = 30.0,
    ) -> None:
        self.offer = offer
        self.client_id = client_id
        self.session_id = offer.session_id
        self.total = math.ceil(offer.image_size / offer.symbol_size)
        self._ss = offer.symbol_size
        self._bs = offer.block_symbols
        self._last_len = offer.image_size - (self.total - 1) * self._ss if self.total else 0
        self._have = bytearray(self.total)
        self.received = 0
        self.duplicates = 0
        self.rejected = 0
        self._horizon = 0
        self._scan_pos = 0
        self._next_rescan = now + rescan_interval
        self._rescan_interval = rescan_interval
        self._feedback_interval = offer.feedback_interval_ms / 1000.0
        self._keepalive_interval = keepalive_interval
        self._next_status = now
        self._last_status = -math.inf
        self._idle_timeout = idle_timeout
        self._report_timeout = report_timeout
        self._last_heard = now
        self._report: Message | None = None
        self._report_deadline = math.inf
        self._report_backoff = 0.2
        self._next_report = math.inf
        self.reason = ""
        self._events: deque[ReceiverEvent] = deque()
        self.state = RECEIVING
        if self.total == 0:
            self._complete()

    # ------------------------------------------------------------------ inputs

    def receive_datagram(self, data: bytes | bytearray | memoryview, now: float
                         ) -> tuple[int, memoryview] | None:
        """A packet from the group.  Returns (offset, payload) to write, or None.

        Raises :class:`PacketError` for packets that are malformed or not ours;
        the adapter counts them and carries on.
        """
        kind, session, block, symbol, plen = packets.parse_header(data)
        if session != self.session_id:
            raise PacketError("packet of another session")
        if kind == packets.KIND_HEARTBEAT:
            hb = packets.parse_heartbeat(session, memoryview(data)[packets.HEADER_SIZE:packets.HEADER_SIZE + plen])
            if hb.total_symbols != self.total:
                raise PacketError("heartbeat disagrees with the offer")
            self._last_heard = now
            self._horizon = max(self._horizon, hb.sent_through)
            if hb.flags & packets.HB_FINISHED and self.state == RECEIVING:
                self._give_up("the session ended before the image was complete")
            return None
        if symbol >= self._bs:
            raise PacketError("symbol index out of block")
        index = block * self._bs + symbol
        if index >= self.total:
            raise PacketError("symbol beyond end of image")
        if plen != (self._ss if index < self.total - 1 else self._last_len):
            raise PacketError("payload length does not match the offer")
        self._last_heard = now
        if index >= self._horizon:
            self._horizon = index + 1
        if self._have[index]:
            self.duplicates += 1
            return None
        if self.state != RECEIVING:
            return None
        self._have[index] = 1
        self.received += 1
        if self.received == self.total:
            self._complete()
        return index * self._ss, memoryview(data)[packets.HEADER_SIZE:packets.HEADER_SIZE + plen]

    def handle_message(self, msg: Message, now: float) -> None:
        """A session-plane message from the DP (only ``Ack`` matters after the offer)."""
        if not isinstance(msg, Ack) or msg.session_id != self.session_id or msg.client_id != self.client_id:
            self.rejected += 1
            return
        if self.state != REPORTING:
            return
        self._last_heard = now
        self.state = ACKED
        self.reason = msg.reason
        self._events.append(Acknowledged(msg.outcome, msg.reason))

    def verified(self, sha256: str, nbytes: int, seconds: float, now: float) -> None:
        """The adapter verified the written output; report success until acknowledged."""
        self._start_report(Done(session_id=self.session_id, client_id=self.client_id, sha256=sha256,
                                bytes=nbytes, seconds=round(seconds, 6)), now)

    def fail(self, reason: str, now: float) -> None:
        """The adapter cannot complete (write error, digest mismatch...); report the reason."""
        self.reason = reason
        self._start_report(Failed(session_id=self.session_id, client_id=self.client_id,
                                  reason=reason[:500]), now)

    def handle_timer(self, now: float) -> None:
        # COMPLETE is exempt: every byte is here, only local verification is left (which can take
        # minutes for a large image while the sender may already be gone).
        if self.state == RECEIVING and now - self._last_heard > self._idle_timeout:
            self._give_up(f"nothing heard from the sender for {self._idle_timeout:g} s")
        elif self.state == REPORTING and now > self._report_deadline:
            self._give_up(f"the DP did not acknowledge our result within {self._report_timeout:g} s")

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self, now: float) -> list[Message]:
        """Session-plane messages for the DP (status/NAK, done, failed)."""
        out: list[Message] = []
        if self.state in (RECEIVING, COMPLETE) and now >= self._next_status:
            # While COMPLETE (verifying) this is a keepalive, so the sender does not drop us.
            self._next_status = now + self._feedback_interval
            missing = self._missing_ranges(now)
            if missing or now - self._last_status >= self._keepalive_interval:
                self._last_status = now
                out.append(Status(session_id=self.session_id, client_id=self.client_id,
                                  received=self.received, missing=missing))
        elif self.state == REPORTING and now >= self._next_report and self._report is not None:
            out.append(self._report)
            self._next_report = now + self._report_backoff
            self._report_backoff = min(2.0, self._report_backoff * 2)
        return out

    def next_event(self) -> ReceiverEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        if self.state == RECEIVING:
            return min(self._next_status, self._last_heard + self._idle_timeout)
        if self.state == REPORTING:
            return min(self._next_report, self._report_deadline)
        if self.state == COMPLETE:
            return self._next_status
        return math.inf

    @property
    def done(self) -> bool:
        return self.state in (ACKED, GAVE_UP)

    def missing_count(self) -> int:
        return self.total - self.received

    # ------------------------------------------------------------------ internals

    def _missing_ranges(self, now: float) -> list[list[int]]:
        have, horizon = self._have, self._horizon
        ranges: list[list[int]] = []
        pos = self._scan_pos
        while len(ranges) < MAX_RANGES_PER_STATUS and pos < horizon:
            a = have.find(0, pos, horizon)
            if a < 0:
                pos = horizon
                break
            b = have.find(1, a, horizon)
            if b < 0:
                b = horizon
            ranges.append([a, b - a])
            pos = b
        self._scan_pos = pos
        if pos >= horizon and now >= self._next_rescan:
            # Re-ask, from the start, for gaps whose repair was lost too.
            self._scan_pos = 0
            self._next_rescan = now + self._rescan_interval
        return ranges

    def _complete(self) -> None:
        self.state = COMPLETE
        self._events.append(TransferComplete())

    def _start_report(self, msg: Message, now: float) -> None:
        if self.state in (ACKED, GAVE_UP, REPORTING):
            return
        self.state = REPORTING
        self._report = msg
        self._next_report = now
        self._report_deadline = now + self._report_timeout

    def _give_up(self, reason: str) -> None:
        self.state = GAVE_UP
        self.reason = reason
        self._events.append(GaveUp(reason))
