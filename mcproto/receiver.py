"""Sans-I/O multicast receiver for one session (the client side).

Pure: no sockets, no clock, no file I/O.  Inputs: ``receive_datagram(data,
now)`` for packets from the group, ``handle_message(msg, now)`` for
session-plane answers from the DP, ``handle_timer(now)`` at ``get_timer()``,
and the adapter's verdict on the written output (``verified``/``fail``).
Outputs: ``receive_datagram`` returns ``(offset, block_bytes)`` when a block
is complete (decoded if needed), else None; ``datagrams_to_send(now)``
returns session-plane messages for the DP; ``next_event()`` returns
``TransferComplete``, ``Acknowledged`` or ``GaveUp``.

States::

    RECEIVING --(every block complete)--> COMPLETE --(adapter verified / failed)--> REPORTING
    REPORTING --(Ack from DP)--> ACKED
    any --(sender silent, session over, no ack)--> GAVE_UP

Feedback: every ``feedback_interval`` the receiver reports, for blocks the
sender has passed and it has not finished, how many more symbols each needs
(any symbols will do: Reed-Solomon is MDS), compressed into ranges of equal
need.  A block reported once is reported again only after
``rescan_interval``, which gives its repair time to arrive.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from mcproto import packets
from mcproto.errors import ForeignPacket, PacketError
from mcproto.events import Acknowledged, GaveUp, Moved, ReceiverEvent, TransferComplete
from mcproto.fec import codec_for, offer_layout
from mcproto.messages import MAX_RANGES_PER_STATUS, Ack, Done, Drop, Failed, Message, Offer, Status
from mcproto.seal import PacketOpener

RECEIVING = "RECEIVING"
COMPLETE = "COMPLETE"
REPORTING = "REPORTING"
ACKED = "ACKED"
GAVE_UP = "GAVE_UP"
END_GRACE_S = 1.0  # after the sender says it finished, how long a receiver still waits for a Drop or Ack
MAX_PARTIAL_BYTES = 32 * 1024 * 1024  # symbols of unfinished blocks held before no new block is started


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
        key: bytes | None = None,
        done_blocks: Iterable[int] = (),
        max_partial_bytes: int = MAX_PARTIAL_BYTES,
    ) -> None:
        self.offer = offer
        # Symbols of unfinished blocks are held in memory until a block has k; a receiver that lags far
        # behind (CPU-starved, overrun) could otherwise hold most of the image.  Past this bound no new
        # block is started (its symbols are dropped and counted) until started ones finish: a window.
        self.max_partial_bytes = max_partial_bytes
        self._partial_bytes = 0
        self.window_dropped = 0
        self._ended_at: float | None = None  # when a heartbeat said the session is over (see END_GRACE_S)
        self.client_id = client_id
        self.session_id = offer.session_id
        # With a session key every packet must authenticate (format v2); forgeries are PacketErrors.
        self._opener = PacketOpener(key, offer.session_id) if key else None
        self.layout = offer_layout(offer)  # zfec "rs" or wide "rs16", as the offer says
        self.blocks = self.layout.blocks
        self._ss = offer.symbol_size
        self._codec = codec_for(self.layout)
        self._n_max = self.layout.n_max(0)  # symbol ids per block (the last block may have fewer)
        self._done = bytearray(self.blocks)
        self._partial: dict[int, dict[int, bytes]] = {}  # block -> esi -> symbol
        self.blocks_done = 0
        self.symbols = 0
        self.duplicates = 0
        self.decoded_blocks = 0
        self.rejected = 0
        self._loss = 0.0  # EWMA of the loss seen in bursts of one block's packets
        self._burst = [0, 0, 0]  # packets, ids skipped, previous id: the current burst of one block's packets
        self._horizon = 0  # blocks below this have been passed by the sender's first pass
        self._last_block = -1  # block of the previous data packet
        self._prompt: set[int] = set()  # blocks the sender moved on from while still unfinished: ask now
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
        self.unicast_allowed = False
        # Receive rate: data packets since the last status, and when the first and last arrived
        # (measured while packets flow, so a pause of the sender is not taken for a slow client).
        self._window_symbols = 0
        self._window_first = -1.0
        self._window_last = -1.0
        self._events: deque[ReceiverEvent] = deque()
        self.state = RECEIVING
        # Blocks already committed (a resumed receive): counted as done, never asked for again.
        for b in done_blocks:
            if 0 <= b < self.blocks and not self._done[b]:
                self._done[b] = 1
                self.blocks_done += 1
        if self.blocks_done == self.blocks:
            self._complete()

    # ------------------------------------------------------------------ inputs

    def receive_datagram(self, data: bytes | bytearray | memoryview, now: float) -> tuple[int, bytes] | None:
        """A packet from the group.  Returns (offset, bytes) of a block just completed, or None.

        Raises :class:`PacketError` for packets that are malformed or not ours;
        the adapter counts them and carries on.
        """
        if self._opener is not None:
            if len(data) > 3 and data[2] == packets.PACKET_VERSION and data[3] == packets.KIND_ANNOUNCE:
                return None  # a DP session's announce stays in the clear (it is for finding the session)
            kind, block, esi, payload = self._opener.open(data)  # authenticates; only our session
            session, plen, body = self.session_id, len(payload), memoryview(payload)
        else:
            kind, session, block, esi, plen = packets.parse_header(data)
            if session != self.session_id:
                raise ForeignPacket("packet of another session")
            body = memoryview(data)[packets.HEADER_SIZE:packets.HEADER_SIZE + plen]
        if kind == packets.KIND_ANNOUNCE:
            return None  # for finding the session; a joined receiver has no use for it
        if kind == packets.KIND_HEARTBEAT:
            hb = packets.parse_heartbeat(session, body)
            if hb.total_blocks != self.blocks:
                raise PacketError("heartbeat disagrees with the offer")
            self._last_heard = now
            self._horizon = max(self._horizon, hb.sent_through)
            self._feedback_interval = hb.feedback_ms / 1000.0
            if hb.flags & packets.HB_FINISHED and self.state == RECEIVING and self._ended_at is None:
                # Give up shortly, not at once: a Drop telling us why (and whether unicast is allowed) may
                # still be on its way over the session plane, which multicast heartbeats can overtake.
                self._ended_at = now
            return None
        if block >= self.blocks:
            raise PacketError("block beyond end of image")
        n_max = self._n_max if block + 1 < self.blocks else self.layout.n_max(block)
        if esi >= n_max:
            raise PacketError("symbol id out of range")
        if plen != self._ss:
            raise PacketError("payload length does not match the offer")
        self._last_heard = now
        self._window_symbols += 1  # arrival rate, duplicates included: what this receiver can take in
        if self._window_first < 0:
            self._window_first = now
        self._window_last = now
        if block > self._horizon:
            self._horizon = block  # the sender is on ``block``: every block before it was sent
        burst = self._burst
        if block != self._last_block:
            # The sender moved on (a repair or catch-up burst ended): if that block is still short,
            # ask at the next status instead of waiting for the periodic rescan.
            if 0 <= self._last_block < self.blocks and not self._done[self._last_block]:
                self._prompt.add(self._last_block)
            self._last_block = block
            self._end_burst()
        # Symbol ids within a burst are consecutive on the wire (modulo n_max: repair ids cycle), so
        # skipped ids are packets lost on the way (the network, or our own full socket buffer); the
        # sender's rate control reads this.  A small step back is a reordered packet filling a gap.
        if burst[0] == 0:
            burst[0], burst[2] = 1, esi
        else:
            step = (esi - burst[2]) % n_max
            if 1 <= step <= n_max >> 1:
                burst[0], burst[1], burst[2] = burst[0] + 1, burst[1] + step - 1, esi
            elif step > n_max >> 1:
                burst[0], burst[1] = burst[0] + 1, max(0, burst[1] - 1)
        if self._done[block] or self.state != RECEIVING:
            self.duplicates += 1
            return None
        syms = self._partial.get(block)
        if syms is None:
            if self._partial_bytes >= self.max_partial_bytes:
                # A receive window: over the bound, no new block is started; the blocks already
                # started keep collecting (their repairs are asked for) and free memory as they finish.
                self.window_dropped += 1
                return None
            syms = self._partial[block] = {}
        elif esi in syms:
            self.duplicates += 1
            return None
        syms[esi] = bytes(body)
        self.symbols += 1
        self._partial_bytes += plen
        k = self.layout.block_k(block)
        if len(syms) < k:
            return None
        return self._complete_block(block, k, syms)

    def handle_message(self, msg: Message, now: float) -> None:
        """A session-plane message from the DP: ``Ack`` of our result, or ``Drop`` (too slow)."""
        if isinstance(msg, Offer) and msg.session_id == self.session_id:
            # Moved to another stream of the same session (a slower tier): same image, same layout.
            same = (msg.image_size, msg.image_sha256, msg.symbol_size, msg.block_symbols, msg.fec,
                    msg.repair_symbols) == (
                self.offer.image_size, self.offer.image_sha256, self.offer.symbol_size, self.offer.block_symbols,
                self.offer.fec, self.offer.repair_symbols)
            if same and (msg.group, msg.port) != (self.offer.group, self.offer.port) and self.state == RECEIVING:
                self.offer = msg
                self._last_heard = now
                self._events.append(Moved(msg.group, msg.port))
            return
        if not isinstance(msg, Ack | Drop) or msg.session_id != self.session_id or msg.client_id != self.client_id:
            self.rejected += 1
            return
        if isinstance(msg, Drop):
            if self.state in (RECEIVING, COMPLETE):
                self.unicast_allowed = msg.unicast_allowed
                self._give_up(f"dropped by the DP: {msg.reason}")
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

    def forget(self, blocks: list[int], now: float) -> None:
        """The adapter found these completed blocks wrong (a chunk failed the signed manifest):
        receive them again.  Undoes completion if it was reached; they are asked for at once."""
        if self.state not in (RECEIVING, COMPLETE):
            return
        for b in blocks:
            if 0 <= b < self.blocks and self._done[b]:
                self._done[b] = 0
                self.blocks_done -= 1
                self._partial_bytes -= len(self._partial.pop(b, {})) * self._ss
                self._prompt.add(b)
        if self.state == COMPLETE and self.blocks_done < self.blocks:
            self.state = RECEIVING
            self._last_heard = now
            self._events = deque(e for e in self._events if not isinstance(e, TransferComplete))
        self._next_status = min(self._next_status, now)

    def handle_timer(self, now: float) -> None:
        # COMPLETE is exempt: every byte is here, only local verification is left (which can take
        # minutes for a large image while the sender may already be gone).
        if self.state == RECEIVING and self._ended_at is not None and now - self._ended_at >= END_GRACE_S:
            self._give_up("the session ended before the image was complete")
        elif self.state == RECEIVING and now - self._last_heard > self._idle_timeout:
            self._give_up(f"nothing heard from the sender for {self._idle_timeout:g} s")
        elif self.state == REPORTING and now > self._report_deadline:
            self._give_up(f"the DP did not acknowledge our result within {self._report_timeout:g} s")

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self, now: float) -> list[Message]:
        """Session-plane messages for the DP (status with needs, done, failed)."""
        out: list[Message] = []
        if self.state in (RECEIVING, COMPLETE) and now >= self._next_status:
            # While COMPLETE (verifying) this is a keepalive, so the sender does not drop us.
            self._next_status = now + self._feedback_interval
            needs = self._needs(now) if self.state == RECEIVING else []
            if needs or now - self._last_status >= self._keepalive_interval:
                self._last_status = now
                kbps = self._receive_kbps()
                out.append(Status(session_id=self.session_id, client_id=self.client_id,
                                  blocks_done=self.blocks_done, needs=needs,
                                  loss_permille=min(1000, round(self._loss * 1000)),
                                  recv_kbps=kbps if self.state == RECEIVING else None))
        elif self.state == REPORTING and now >= self._next_report and self._report is not None:
            out.append(self._report)
            self._next_report = now + self._report_backoff
            self._report_backoff = min(2.0, self._report_backoff * 2)
        return out

    def next_event(self) -> ReceiverEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        if self.state == RECEIVING:
            ended = self._ended_at + END_GRACE_S if self._ended_at is not None else math.inf
            return min(self._next_status, self._last_heard + self._idle_timeout, ended)
        if self.state == REPORTING:
            return min(self._next_report, self._report_deadline)
        if self.state == COMPLETE:
            return self._next_status
        return math.inf

    @property
    def done(self) -> bool:
        return self.state in (ACKED, GAVE_UP)

    # ------------------------------------------------------------------ internals

    def _complete_block(self, block: int, k: int, syms: dict[int, bytes]) -> tuple[int, bytes]:
        missing_source = sum(1 for e in range(k) if e not in syms)
        if missing_source:
            esis = sorted(syms)[:k]
            source = self._codec.decode([syms[e] for e in esis], esis, k)
            self.decoded_blocks += 1
        else:
            source = [syms[e] for e in range(k)]
        self._partial_bytes -= len(self._partial.pop(block)) * self._ss
        self._done[block] = 1
        self.blocks_done += 1

        if self.blocks_done == self.blocks:
            self._complete()
        data = b"".join(source)[: self.layout.block_len(block)]
        return self.layout.block_offset(block), data

    def _needs(self, now: float) -> list[list[int]]:
        """Ranges [first_block, count, need] of passed, unfinished blocks, from the scan position."""
        done, horizon, layout = self._done, self._horizon, self.layout
        ranges: list[list[int]] = []
        for b in sorted(self._prompt):
            if not done[b] and len(ranges) < MAX_RANGES_PER_STATUS // 2:
                ranges.append([b, 1, layout.block_k(b) - len(self._partial.get(b, ()))])
        self._prompt.clear()
        pos = self._scan_pos
        while len(ranges) < MAX_RANGES_PER_STATUS and pos < horizon:
            b = done.find(0, pos, horizon)
            if b < 0:
                pos = horizon
                break
            need = layout.block_k(b) - len(self._partial.get(b, ()))
            if ranges and ranges[-1][0] + ranges[-1][1] == b and ranges[-1][2] == need:
                ranges[-1][1] += 1
            else:
                ranges.append([b, 1, need])
            pos = b + 1
        self._scan_pos = pos
        if pos >= horizon and now >= self._next_rescan:
            # Re-ask, from the start, for blocks whose repair was lost too.
            self._scan_pos = 0
            self._next_rescan = now + self._rescan_interval
        return ranges

    def _receive_kbps(self) -> int | None:
        """The data rate arriving here since the last status; None when too few packets to tell."""
        n, span = self._window_symbols, self._window_last - self._window_first
        self._window_symbols, self._window_first, self._window_last = 0, -1.0, -1.0
        if n < 16 or span <= 0:
            return None
        return round((n - 1) * self._ss * 8 / span / 1000)

    def _end_burst(self) -> None:
        count, gaps, _ = self._burst
        span = count + gaps
        if span >= 8:
            weight = min(0.25, span / 1024)  # a burst of a whole block counts about 1/8
            self._loss = (1 - weight) * self._loss + weight * (gaps / span)
        self._burst[:] = [0, 0, 0]

    def _complete(self) -> None:
        self.state = COMPLETE
        self._partial.clear()
        self._partial_bytes = 0
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
        self._partial.clear()
        self._partial_bytes = 0
        self._events.append(GaveUp(reason))
