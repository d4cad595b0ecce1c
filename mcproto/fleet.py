"""A vectorized, count-based model of many multicast receivers, for ``mcdeploy simulate``.

Pure: no sockets, no clock, no file I/O; driven like :class:`mcproto.receiver.Receiver`
(bytes and ``now`` in, session-plane messages out), but for N receivers at once,
each packet applied to all of them with a few numpy operations.

Server side only.  The client (WinPE) never imports this module: it needs numpy,
which the client does not ship, and it exists so that the *real* sans-I/O
:class:`mcproto.sender.Sender` can be run against a thousand receivers in
seconds instead of the ~200 M Python calls a thousand real ``Receiver``
objects would cost for a 256 MiB image.

Why counting is exact: the erasure code is Reed-Solomon (:mod:`mcproto.fec`, zfec
"rs" or the wide "rs16"), which is MDS, so a receiver holding any ``k`` distinct symbol ids of a block
decodes it, and what a receiver asks for ("block b: m more") depends only on
*how many* distinct ids it holds.  The fleet therefore keeps, per receiver and
per block with traffic in flight, the set of ids held (an n_max-bit bitset per
receiver: 256 bits for zfec, k + R for rs16) and the count, and forgets a block as soon as no receiver still
collecting it holds part of it (a receiver with no symbol of a block and one
that never saw the block are the same).  Payload bytes are never looked at: the
fleet proves the *policy* (who asks for what, when), while the simulator's few
real ``Receiver`` objects prove the decode path bit-exact on the same packets.
The ``Done`` a fleet receiver sends carries the image's SHA-256 given at
construction, not one computed from data it does not hold.

The feedback policy mirrors ``Receiver`` line by line (a cross-check test runs
both on the same loss decisions and compares every ``Status``): the horizon is
the highest block seen and the heartbeats' ``sent_through``; a block the sender
moved away from while unfinished is reported promptly (at most 32 such ranges);
the scan over passed blocks continues where it stopped and restarts from block
0 only after ``rescan_interval``; at most 64 ranges per ``Status``; a keepalive
``Status`` every ``keepalive_interval`` without needs; the report pace follows
the heartbeats' ``feedback_ms``; ``loss_permille`` is the EWMA of the gaps in
the symbol ids of each burst of one block's packets; ``recv_kbps`` is the data
arrival rate since the last status.  Keep the two in step when either changes.
"""

from __future__ import annotations

import math

import numpy as np

from mcproto import packets
from mcproto.errors import PacketError
from mcproto.fec import offer_layout
from mcproto.messages import MAX_RANGES_PER_STATUS, Ack, Done, Drop, Message, Offer, Status

# Receiver states, as small integers so that they vectorize (names as in mcproto.receiver).
IDLE = 0  # not joined yet (no offer)
RECEIVING = 1
COMPLETE = 2
REPORTING = 3
ACKED = 4
GAVE_UP = 5
STATE_NAMES = ("IDLE", "RECEIVING", "COMPLETE", "REPORTING", "ACKED", "GAVE_UP")


class ReceiverFleet:
    """N receivers of one session, one row each; see the module docstring.

    Inputs: :meth:`join` (the offer reached these receivers), :meth:`receive_datagram`
    (a packet and which receivers it reached), :meth:`handle_message` (an answer from
    the DP to one receiver).  Output: :meth:`tick` runs the timers and returns the
    session-plane messages due, as (receiver index, message) pairs.
    """

    def __init__(
        self,
        offer: Offer,
        n: int,
        *,
        image_sha256: str,
        client_ids: list[str] | None = None,
        rescan_interval: float = 0.25,
        keepalive_interval: float = 0.5,
        idle_timeout: float = 30.0,
        report_timeout: float = 30.0,
    ) -> None:
        self.offer = offer
        self.n = n
        self.session_id = offer.session_id
        self.layout = offer_layout(offer)
        self.blocks = self.layout.blocks
        self._n_max = self.layout.n_max(0)  # symbol ids per block (the last block may have fewer)
        self._words = -(-self._n_max // 64)  # a block's symbol ids as 64-bit words per receiver
        self.image_sha256 = image_sha256
        self.client_ids = client_ids or [f"fleet{i:05d}" for i in range(n)]
        self._ss = offer.symbol_size
        self._fi = offer.feedback_interval_ms / 1000.0
        self._rescan = rescan_interval
        self._keepalive = keepalive_interval
        self._idle_timeout = idle_timeout
        self._report_timeout = report_timeout
        nb = self.blocks
        self._k = np.array([self.layout.block_k(b) for b in range(nb)], dtype=np.int64)
        # Per receiver (vectors of length n).
        self.state = np.zeros(n, dtype=np.int8)
        self._receiving = np.zeros(n, dtype=bool)  # state == RECEIVING, kept in step for speed
        self.joined_at = np.full(n, math.nan)
        self.complete_at = np.full(n, math.nan)  # every block in (the receiver's TransferComplete)
        self.finished_at = np.full(n, math.nan)  # acked or gave up
        self.reason = [""] * n
        self.blocks_done = np.zeros(n, dtype=np.int64)
        self.loss = np.zeros(n)  # EWMA of the loss seen in bursts of one block's packets
        # The current burst (consecutive packets of one block): packets, ids skipped, previous id.
        self._burst_count = np.zeros(n, dtype=np.int64)
        self._burst_gaps = np.zeros(n, dtype=np.int64)
        self._burst_prev = np.zeros(n, dtype=np.int64)
        self.feedback_interval = np.full(n, self._fi)  # the heartbeats' pace overrides the offer's
        self._window_symbols = np.zeros(n, dtype=np.int64)  # data packets since the last status
        self._window_first = np.full(n, -1.0)  # when the first and last of them arrived
        self._window_last = np.full(n, -1.0)
        self.horizon = np.zeros(n, dtype=np.int64)
        self.last_block = np.full(n, -1, dtype=np.int64)
        self.scan_pos = np.zeros(n, dtype=np.int64)
        self.next_rescan = np.zeros(n)
        self.next_status = np.zeros(n)
        self.last_status = np.full(n, -math.inf)
        self.last_heard = np.zeros(n)
        self._heard = np.zeros(n, dtype=bool)  # heard something this tick (``now`` is one value per tick)
        self.next_report = np.full(n, math.inf)
        self.report_deadline = np.full(n, math.inf)
        self.report_backoff = np.full(n, 0.2)
        self.rejected = np.zeros(n, dtype=np.int64)
        # Per block x receiver: finished blocks (block-major: one packet reads one row).
        self.done = np.zeros((nb, n), dtype=bool)
        # Per receiver x block: blocks the sender moved away from while unfinished (Receiver._prompt).
        self.prompt = np.zeros((n, nb), dtype=bool)
        self._has_prompt = np.zeros(n, dtype=bool)
        # Blocks with traffic in flight: a slot each, with the ids every receiver holds and their count.
        self._slot_of = np.full(nb, -1, dtype=np.int64)
        self._slot_block: dict[int, int] = {}  # slot -> block
        self._free: list[int] = []
        self._have = np.zeros((0, self._words, n), dtype=np.uint64)
        self._count = np.zeros((0, n), dtype=np.int32)
        self.peak_tracked_blocks = 0
        self.data_deliveries = 0

    # ------------------------------------------------------------------ inputs

    def join(self, receivers: int | list[int] | np.ndarray, now: float) -> None:
        """The offer reached ``receivers`` (indices): they start receiving (``Receiver.__init__``)."""
        which = np.atleast_1d(np.asarray(receivers, dtype=np.int64))
        idx: np.ndarray = which[self.state[which] == IDLE]
        if idx.size == 0:
            return
        self.joined_at[idx] = now
        self.next_rescan[idx] = now + self._rescan
        self.next_status[idx] = now
        self.last_heard[idx] = now
        self._set_state(idx, RECEIVING)
        if self.blocks == 0:
            self._complete(idx, now)

    def receive_datagram(self, data: bytes | bytearray | memoryview, mask: np.ndarray, now: float) -> None:
        """A packet from the group reached the receivers in boolean ``mask``.

        Malformed packets (the header checks of ``Receiver.receive_datagram``) are
        counted in ``rejected`` for those receivers and change nothing else.
        """
        mask = mask & self._receiving  # others hold every block already, or are not there
        try:
            kind, session, block, esi, plen = packets.parse_header(data)
            if session != self.session_id:
                raise PacketError("packet of another session")
            if kind == packets.KIND_ANNOUNCE:
                return
            if kind == packets.KIND_HEARTBEAT:
                hb = packets.parse_heartbeat(session, memoryview(data)[packets.HEADER_SIZE:packets.HEADER_SIZE + plen])
                if hb.total_blocks != self.blocks:
                    raise PacketError("heartbeat disagrees with the offer")
            elif block >= self.blocks or esi >= self._block_n_max(block) or plen != self._ss:
                raise PacketError("data packet out of range")
        except PacketError:
            self.rejected += mask
            return
        self._heard |= mask
        if kind == packets.KIND_HEARTBEAT:
            np.maximum(self.horizon, hb.sent_through, out=self.horizon, where=mask)
            self.feedback_interval[mask] = hb.feedback_ms / 1000.0
            if hb.flags & packets.HB_FINISHED:
                idx = np.flatnonzero(mask)
                if idx.size:
                    self._give_up(idx, "the session ended before the image was complete", now)
            return
        self._data(block, esi, mask, now)

    def handle_message(self, i: int, msg: Message, now: float) -> None:
        """A session-plane answer from the DP to receiver ``i``: ``Ack`` of its result, or ``Drop``.

        (An ``Offer`` moving it to another stream is not modelled: the simulator runs one stream.)
        """
        if not isinstance(msg, Ack | Drop) or msg.session_id != self.session_id or msg.client_id != self.client_ids[i]:
            return
        if isinstance(msg, Drop):
            if self.state[i] in (RECEIVING, COMPLETE):
                self._give_up(np.array([i]), f"dropped by the DP: {msg.reason}", now)
            return
        if self.state[i] != REPORTING:
            return
        self.last_heard[i] = now
        self.state[i] = ACKED
        self.finished_at[i] = now
        self.reason[i] = msg.reason

    # ------------------------------------------------------------------ the tick

    def tick(self, now: float) -> list[tuple[int, Message]]:
        """Timers, completion and feedback at ``now``: the messages each receiver sends now.

        Mirrors, per receiver, ``handle_timer``, the adapter verifying a complete image
        at once (as the test harness does), then ``datagrams_to_send``.
        """
        if self._heard.any():
            self.last_heard[self._heard] = now
            self._heard[:] = False
        idle = self._receiving & (now - self.last_heard > self._idle_timeout)
        if idle.any():
            self._give_up(np.flatnonzero(idle), f"nothing heard from the sender for {self._idle_timeout:g} s", now)
        late = (self.state == REPORTING) & (now > self.report_deadline)
        if late.any():
            self._give_up(np.flatnonzero(late),
                          f"the DP did not acknowledge our result within {self._report_timeout:g} s", now)
        complete = np.flatnonzero(self.state == COMPLETE)
        if complete.size:  # verified: report Done until acknowledged
            self.state[complete] = REPORTING
            self.next_report[complete] = now
            self.report_deadline[complete] = now + self._report_timeout
        out: list[tuple[int, Message]] = []
        for i in np.flatnonzero(self._receiving & (now >= self.next_status)).tolist():
            self.next_status[i] = now + float(self.feedback_interval[i])
            needs = self._needs(i, now)
            if needs or now - self.last_status[i] >= self._keepalive:
                self.last_status[i] = now
                # Receiver._receive_kbps
                n, span = int(self._window_symbols[i]), float(self._window_last[i] - self._window_first[i])
                kbps = round((n - 1) * self._ss * 8 / span / 1000) if n >= 16 and span > 0 else None
                self._window_symbols[i], self._window_first[i], self._window_last[i] = 0, -1.0, -1.0
                out.append((i, Status(session_id=self.session_id, client_id=self.client_ids[i],
                                      blocks_done=int(self.blocks_done[i]), needs=needs,
                                      loss_permille=min(1000, round(float(self.loss[i]) * 1000)),
                                      recv_kbps=kbps)))
        for i in np.flatnonzero((self.state == REPORTING) & (now >= self.next_report)).tolist():
            seconds = float(self.complete_at[i] - self.joined_at[i])
            out.append((i, Done(session_id=self.session_id, client_id=self.client_ids[i],
                                sha256=self.image_sha256, bytes=self.layout.image_size,
                                seconds=round(max(0.0, seconds), 6))))
            self.next_report[i] = now + self.report_backoff[i]
            self.report_backoff[i] = min(2.0, self.report_backoff[i] * 2)
        self._collect()
        return out

    # ------------------------------------------------------------------ queries

    @property
    def finished(self) -> np.ndarray:
        """Receivers in a terminal state (``Receiver.done``)."""
        return (self.state == ACKED) | (self.state == GAVE_UP)

    @property
    def tracked_blocks(self) -> int:
        return len(self._slot_block)

    def need_of(self, i: int, b: int) -> int:
        """Symbols receiver ``i`` still needs for block ``b`` (0 once finished)."""
        if self.done[b, i]:
            return 0
        s = self._slot_of[b]
        return int(self._k[b]) - (int(self._count[s, i]) if s >= 0 else 0)

    # ------------------------------------------------------------------ internals

    def _block_n_max(self, b: int) -> int:
        return self._n_max if b + 1 < self.blocks else self.layout.n_max(b)

    def _set_state(self, idx: np.ndarray, state: int) -> None:
        self.state[idx] = state
        self._receiving[idx] = state == RECEIVING

    def _data(self, b: int, esi: int, mask: np.ndarray, now: float) -> None:
        """One DATA packet of block ``b``, id ``esi``, at the receiving receivers in ``mask``."""
        self.data_deliveries += 1
        self._window_symbols += mask
        np.copyto(self._window_first, now, where=mask & (self._window_first < 0))
        np.copyto(self._window_last, now, where=mask)
        np.maximum(self.horizon, b, out=self.horizon, where=mask)
        moved = mask & (self.last_block != b)
        if moved.any():
            # The sender moved on: a block left unfinished is asked for at the next status.
            idx = np.flatnonzero(moved)
            prev = self.last_block[idx]
            keep = prev >= 0
            pidx, prev = idx[keep], prev[keep]
            unfinished = ~self.done[prev, pidx]
            pidx, prev = pidx[unfinished], prev[unfinished]
            self.prompt[pidx, prev] = True
            self._has_prompt[pidx] = True
            self.last_block[moved] = b
            self._end_burst(idx)
        # Receiver.receive_datagram's burst bookkeeping, vectorized (ids modulo n_max).
        n_max = self._block_n_max(b)
        fresh = mask & (self._burst_count == 0)
        cont = mask & ~fresh
        step = (esi - self._burst_prev) % n_max
        fwd = cont & (step >= 1) & (step <= n_max >> 1)
        back = cont & (step > n_max >> 1)
        self._burst_gaps += np.where(fwd, step - 1, 0)
        np.maximum(self._burst_gaps - back, 0, out=self._burst_gaps)
        self._burst_prev[fwd | fresh] = esi
        self._burst_count += fresh | fwd | back
        rec = mask & ~self.done[b]
        if not rec.any():
            return
        s = self._slot(b)
        word = self._have[s, esi >> 6]
        bit = np.uint64(1 << (esi & 63))
        new = rec & ((word & bit) == 0)
        if not new.any():
            return
        np.bitwise_or(word, bit, out=word, where=new)
        count = self._count[s]
        count += new
        k = int(self._k[b])
        finished = new & (count >= k)
        if finished.any():
            self._complete_block(np.flatnonzero(finished), b, s, k, now)

    def _end_burst(self, idx: np.ndarray) -> None:
        """``Receiver._end_burst``: the gaps in a finished burst's ids feed the loss EWMA."""
        gaps = self._burst_gaps[idx]
        span = self._burst_count[idx] + gaps
        use = span >= 8
        if use.any():
            j, gaps, span = idx[use], gaps[use], span[use]
            weight = np.minimum(0.25, span / 1024)
            self.loss[j] = (1 - weight) * self.loss[j] + weight * (gaps / span)
        self._burst_count[idx] = 0
        self._burst_gaps[idx] = 0
        self._burst_prev[idx] = 0

    def _complete_block(self, idx: np.ndarray, b: int, s: int, k: int, now: float) -> None:
        self.done[b, idx] = True
        self.blocks_done[idx] += 1
        whole = idx[self.blocks_done[idx] == self.blocks]
        if whole.size:
            self._complete(whole, now)

    def _complete(self, idx: np.ndarray, now: float) -> None:
        self._set_state(idx, COMPLETE)
        self.complete_at[idx] = now

    def _give_up(self, idx: np.ndarray, reason: str, now: float) -> None:
        idx = idx[(self.state[idx] != ACKED) & (self.state[idx] != GAVE_UP)]
        self._set_state(idx, GAVE_UP)
        self.finished_at[idx] = now
        for i in idx.tolist():
            self.reason[i] = reason

    def _slot(self, b: int) -> int:
        """The slot tracking block ``b``'s ids, allocated empty on its first traffic."""
        s = int(self._slot_of[b])
        if s >= 0:
            return s
        if not self._free:
            cap = len(self._have)
            grow = max(16, cap)
            self._have = np.concatenate([self._have, np.zeros((grow, self._words, self.n), dtype=np.uint64)])
            self._count = np.concatenate([self._count, np.zeros((grow, self.n), dtype=np.int32)])
            self._free.extend(range(cap + grow - 1, cap - 1, -1))
        s = self._free.pop()
        self._have[s] = 0
        self._count[s] = 0
        self._slot_of[b] = s
        self._slot_block[s] = b
        self.peak_tracked_blocks = max(self.peak_tracked_blocks, len(self._slot_block))
        return s

    def _collect(self) -> None:
        """Forget blocks that no receiver still collecting holds part of (they are all-or-nothing now)."""
        if not self._slot_block:
            return
        slots = np.fromiter(self._slot_block.keys(), dtype=np.int64, count=len(self._slot_block))
        blocks = np.fromiter(self._slot_block.values(), dtype=np.int64, count=len(self._slot_block))
        idle = ~((self._count[slots] > 0) & ~self.done[blocks] & self._receiving).any(axis=1)
        for s, b in zip(slots[idle].tolist(), blocks[idle].tolist(), strict=True):
            del self._slot_block[s]
            self._slot_of[b] = -1
            self._free.append(s)

    def _needs(self, i: int, now: float) -> list[list[int]]:
        """``Receiver._needs`` for receiver ``i``: [first_block, count, need] ranges."""
        horizon = int(self.horizon[i])
        ranges: list[list[int]] = []
        if self._has_prompt[i]:
            row = self.prompt[i]
            for b in np.flatnonzero(row).tolist():
                if not self.done[b, i] and len(ranges) < MAX_RANGES_PER_STATUS // 2:
                    ranges.append([b, 1, self.need_of(i, b)])
            row[:] = False
            self._has_prompt[i] = False
        pos = int(self.scan_pos[i])
        if pos < horizon and len(ranges) < MAX_RANGES_PER_STATUS:
            cand = pos + np.flatnonzero(~self.done[pos:horizon, i])
            if cand.size == 0:
                pos = horizon
            else:
                slots = self._slot_of[cand]
                held = np.where(slots >= 0, self._count[np.maximum(slots, 0), i], 0)
                needs = (self._k[cand] - held).tolist()
                for b, need in zip(cand.tolist(), needs, strict=True):
                    if len(ranges) >= MAX_RANGES_PER_STATUS:
                        break
                    if ranges and ranges[-1][0] + ranges[-1][1] == b and ranges[-1][2] == need:
                        ranges[-1][1] += 1
                    else:
                        ranges.append([b, 1, need])
                    pos = b + 1
                if len(ranges) < MAX_RANGES_PER_STATUS:
                    pos = horizon  # Receiver: done.find() finds no unfinished block left before the horizon
        self.scan_pos[i] = pos
        if pos >= horizon and now >= self.next_rescan[i]:
            self.scan_pos[i] = 0
            self.next_rescan[i] = now + self._rescan
        return ranges
