"""``mcdeploy simulate``: the real sender against many virtual receivers on a virtual clock.

Server side (numpy).  Why it exists: to know what the transport costs at a
scale no test machine reaches (a thousand receivers, each with its own loss
pattern, a 256 MiB image) in about a minute, with the *real* sans-I/O
:class:`mcproto.sender.Sender` making every decision and emitting every packet.

How: the receivers are a :class:`mcproto.fleet.ReceiverFleet`, a vectorized,
count-based model of ``mcproto.receiver.Receiver`` (exact because the code is
MDS; see that module), fed the sender's actual packets through a per-receiver
lossy channel.  Beside the fleet, a few real ``Receiver`` objects ("witnesses",
``--real``) get the same packets through their own channels, write real
bytearrays, decode with the session's code (``--fec``: the wide GF(2^16) "rs16"
by default, zfec "rs") and check the SHA-256: every run proves the decode path
bit-exact.  ``--cross-check`` makes the witnesses replay the loss decisions
of the first fleet receivers and compares every status they send.

Cost accounting: ``bytes_sent`` is every datagram the sender emitted (data and
heartbeats, 24-byte headers and 4-byte CRCs included); the bound is image / (1 - p_max), p_max
the worst long-run loss rate of any receiver.  The JSON also splits the
overhead into headers, the floor of the block code itself (the expected
maximum over receivers of the symbols each needs, with perfect feedback), and
what the protocol adds on top of that floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import heapq
import json
import math
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mcproto import codec, packets
from mcproto.errors import PacketError
from mcproto.events import Acknowledged, GaveUp, TransferComplete
from mcproto.fec import DEFAULT_FEC, DEFAULT_K, FEC_RS, FEC_RS16, default_k, layout_for
from mcproto.fleet import ACKED, ReceiverFleet
from mcproto.messages import Done, Join, Message, Offer, Status
from mcproto.receiver import Receiver
from mcproto.sender import FINISHED, TRANSFERRING, RatePolicy, Sender, SenderConfig, StartPolicy

DESCRIPTION = """\
Run the real multicast sender (mcproto.sender.Sender) against many virtual receivers on a
virtual clock and report completion times and the wire overhead against image / (1 - p_max).

The receivers are a vectorized count-based model of mcproto.receiver.Receiver (exact: the
Reed-Solomon code is MDS, so only how many distinct symbols a receiver holds matters).  A few
real Receiver objects (--real) run beside it on the same packets with their own losses, decode
with the session's code (--fec) and check SHA-256, so every run also proves the decode path bit-exact.

Channel per receiver: independent loss (--loss), Gilbert-Elliott bursts (--burst), reordering,
duplication and corruption.  Corruption flips one bit anywhere in the datagram (header, payload
or checksum): the CRC-32 every packet carries must reject it, and the real receivers prove it
(a corrupted symbol accepted would break their SHA-256).  A CRC stops accidents, not an
attacker: deliberate tampering is detected only once packets are authenticated (AEAD).
Feedback (Status, Done) is lost at each receiver's loss rate; joins and the DP's answers are
not lost.  Receivers join at random times over --join-spread before the transfer starts, so
their report timers are out of step as in a real room of machines (0: all in step).

The overhead is split into headers (+CRC, heartbeats), the floor of the k-symbol block code
itself (the expected maximum over all receivers of the symbols each needs, with perfect
feedback: no repair policy on this code can do better) and what the protocol adds above it.

examples:
  mcdeploy simulate --receivers 1000 --loss 0-5 --size 256MiB --json
  mcdeploy simulate --receivers 200 --loss 1 --burst 0.5,20 --late-join 0.5:3
"""

_REORDER_DELAY = (2, 9)  # a reordered or duplicated packet arrives 2..8 packets' time later


@dataclass
class SimConfig:
    """One simulation; fractions in 0..1, times in seconds, rate in bytes per second."""

    receivers: int = 100
    loss: tuple[float, float] = (0.0, 0.05)
    burst: tuple[float, float] | None = None  # (probability of entering a burst per packet, mean burst length)
    reorder: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    late_fraction: float | None = None
    late_count: int = 1
    join_spread: float = 0.5  # the others join at uniform random times in [0, join_spread); the start waits for all
    size: int = 16 * 1024 * 1024
    rate: float = 1000e6 / 8
    block_symbols: int = DEFAULT_K[DEFAULT_FEC]
    fec: str = DEFAULT_FEC
    repair_symbols: int = 0  # rs16: R (0: the code's default for k)
    symbol_size: int = packets.DEFAULT_SYMBOL_SIZE
    seed: int = 1
    max_time: float | None = None  # None: 30 s + 20 one-pass times
    tick: float = 0.001
    rtt: float = 0.0
    real: int = 4
    cross_check: bool = False  # witnesses replay the first fleet receivers' channels; compare statuses
    sender_options: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- channel


class Channel:
    """Per-receiver fates of the sender's packets: lost, corrupted, delayed, duplicated, delivered.

    Columns are receivers (fleet first, then witnesses).  Loss is independent per packet at
    ``p_good`` or, with bursts, Gilbert-Elliott: a receiver enters the bad state with
    probability ``enter`` per packet and leaves it with ``1/mean_len``; every packet is lost
    in the bad state.  ``mirror`` = (src, dst) columns: dst replays src's decisions exactly.
    """

    def __init__(self, rng: np.random.Generator, p_good: np.ndarray, burst: tuple[float, float] | None,
                 reorder: float, duplicate: float, corrupt: float,
                 mirror: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.rng = rng
        self.p = p_good
        self.n = len(p_good)
        self.enter, self.exit = (burst[0], 1.0 / burst[1]) if burst else (0.0, 1.0)
        self.bad = np.zeros(self.n, dtype=bool)
        self.reorder, self.duplicate, self.corrupt = reorder, duplicate, corrupt
        self.mirror = mirror
        self.seq = 0
        self._pending: list[tuple[int, int, bytes, np.ndarray]] = []
        self._order = 0
        self.packets = np.zeros(self.n, dtype=np.int64)  # packets the channel carried, per receiver
        self.lost = np.zeros(self.n, dtype=np.int64)
        self.corrupted = 0

    @property
    def p_effective(self) -> np.ndarray:
        """Long-run loss rate of each receiver (bursts included)."""
        if not self.enter:
            return self.p.copy()
        bad = self.enter / (self.enter + self.exit)
        return bad + (1 - bad) * self.p

    def _mirror(self, m: np.ndarray) -> np.ndarray:
        if self.mirror is not None:
            m[..., self.mirror[1]] = m[..., self.mirror[0]]
        return m

    def feedback_lost(self) -> np.ndarray:
        """Whether each receiver's message of this tick is lost (at most one per receiver per tick)."""
        return self._mirror(self.rng.random(self.n) < self.p_effective)

    def deliveries(self, pkts: list[bytes]) -> tuple[list[bytes], np.ndarray]:
        """The datagrams arriving this tick, in order, and a (datagrams x receivers) mask of who gets each."""
        npk = len(pkts)
        if npk == 0:
            if not self._pending:
                return [], np.zeros((0, self.n), dtype=bool)
            out = [(p, m) for _, _, p, m in sorted(self._pending)]  # the link went quiet: flush
            self._pending.clear()
            return [p for p, _ in out], np.stack([m for _, m in out])
        u = self.rng.random((npk, self.n))
        if self.enter:
            v = self.rng.random((npk, self.n))
            lost = np.empty((npk, self.n), dtype=bool)
            bad = self.bad
            for j in range(npk):
                lost[j] = bad | (u[j] < self.p)
                bad = np.where(bad, v[j] >= self.exit, v[j] < self.enter)
            self.bad = bad
        else:
            lost = u < self.p
        lost = self._mirror(lost)
        self.packets += npk
        self.lost += lost.sum(axis=0)
        ok = ~lost
        if not (self.reorder or self.duplicate or self.corrupt or self._pending):
            self.seq += npk
            return pkts, ok
        corrupt = self._draw(npk, self.corrupt) & ok
        ok &= ~corrupt
        delayed = self._draw(npk, self.reorder) & ok
        dup = self._draw(npk, self.duplicate) & ok
        ok &= ~delayed
        delays = self.rng.integers(*_REORDER_DELAY, size=(npk, 2))
        out_p: list[bytes] = []
        out_m: list[np.ndarray] = []
        for j, pkt in enumerate(pkts):
            seq = self.seq + j
            while self._pending and self._pending[0][0] <= seq:
                _, _, p, m = heapq.heappop(self._pending)
                out_p.append(p)
                out_m.append(m)
            if corrupt[j].any():
                out_p.append(self._flip(pkt))
                out_m.append(corrupt[j])
                self.corrupted += int(corrupt[j].sum())
            out_p.append(pkt)
            out_m.append(ok[j])
            for mask, delay in ((delayed[j], delays[j, 0]), (dup[j], delays[j, 1])):
                if mask.any():
                    self._order += 1
                    heapq.heappush(self._pending, (seq + int(delay), self._order, pkt, mask))
        self.seq += npk
        return out_p, np.stack(out_m)

    def _draw(self, npk: int, pct: float) -> np.ndarray:
        if not pct:
            return np.zeros((npk, self.n), dtype=bool)
        return self._mirror(self.rng.random((npk, self.n)) < pct)

    def _flip(self, pkt: bytes) -> bytes:
        """The packet with one bit flipped anywhere: header, payload or checksum."""
        data = bytearray(pkt)
        data[int(self.rng.integers(len(data)))] ^= 1 << int(self.rng.integers(8))
        return bytes(data)


# --------------------------------------------------------------------------- analysis


def block_code_floor(p: np.ndarray, k: int, tol: float = 1e-9) -> float:
    """Expected symbols of one block until *every* receiver holds k, with perfect feedback.

    Receiver i needs k + F_i transmissions, F_i ~ NegBin(k, 1 - p_i) failures before its
    k-th success; the sender must go on until the last one: E[max_i (k + F_i)].  No feedback
    scheme on a k-symbol block code can do better under independent loss, so this is the
    floor that the per-block maximum over receivers' binomial tails puts under the overhead.
    """
    p = np.asarray(p, dtype=float)
    p = p[p > 0]
    if p.size == 0:
        return float(k)
    logq, logp = np.log1p(-p), np.log(p)
    cdf = np.zeros(p.size)
    expected = 0.0
    for f in range(100_000):
        logpmf = math.lgamma(k + f) - math.lgamma(k) - math.lgamma(f + 1) + k * logq + f * logp
        cdf = np.minimum(1.0, cdf + np.exp(logpmf))
        all_done = float(np.exp(np.sum(np.log(np.maximum(cdf, 1e-300)))))
        tail = 1.0 - all_done
        if tail < tol:
            break
        expected += tail
    return k + expected


# --------------------------------------------------------------------------- simulation


@dataclass
class Witness:
    """A real Receiver and what the adapter around it does (write, verify, report)."""

    index: int
    client_id: str
    receiver: Receiver | None = None
    out: bytearray = field(default_factory=bytearray)
    joined_at: float = math.nan
    complete_at: float = math.nan
    finished_at: float = math.nan
    outcome: str = ""
    digest_ok: bool | None = None
    rejected: int = 0
    statuses: list[tuple[int, tuple]] = field(default_factory=list)


class Simulation:
    """One session: the real Sender, a ReceiverFleet and a few real Receivers on a virtual clock."""

    def __init__(self, cfg: SimConfig) -> None:
        if cfg.receivers < 1:
            raise ValueError("at least one receiver")
        if cfg.cross_check and cfg.real > cfg.receivers:
            raise ValueError("--cross-check needs --real <= --receivers")
        layout_for(cfg.fec, cfg.size, cfg.symbol_size, cfg.block_symbols, cfg.repair_symbols)  # ValueError if bad
        self.cfg = cfg
        n, m = cfg.receivers, cfg.real
        self.n, self.m = n, m
        seeds = np.random.SeedSequence(cfg.seed).spawn(3)
        prng, crng, irng = (np.random.default_rng(s) for s in seeds)
        lo, hi = cfg.loss
        p = np.empty(n + m)
        p[:n] = prng.uniform(lo, hi, n) if hi > lo else lo
        # Witnesses spread over the loss range, the worst included, unless they replay fleet receivers.
        p[n:] = np.linspace(lo, hi, m) if m > 1 else hi
        mirror = None
        if cfg.cross_check:
            mirror = (np.arange(m), np.arange(n, n + m))
            p[n:] = p[:m]
        self.channel = Channel(crng, p, cfg.burst, cfg.reorder, cfg.duplicate, cfg.corrupt, mirror)
        self.image = irng.bytes(cfg.size)
        self.sha = hashlib.sha256(self.image).hexdigest()
        # Who joins when: late joiners (the last fleet receivers, and the last witness) when the
        # sender has sent that fraction of the image's source symbols.
        self.total_symbols = math.ceil(cfg.size / cfg.symbol_size)
        late_at = -1
        late = np.zeros(n + m, dtype=bool)
        if cfg.late_fraction is not None:
            late_at = math.ceil(cfg.late_fraction * self.total_symbols)
            late[n - min(cfg.late_count, n):n] = True
            if cfg.cross_check:
                late[n:] = late[:m]
            elif m:
                late[n + m - 1] = True
        self.late = late
        self.join_at = np.where(late, max(late_at, 0), -1)  # in source symbols sent
        ticks = max(1, round(cfg.join_spread / cfg.tick))
        self.join_tick = np.where(late, 0, prng.integers(0, ticks, n + m))  # in ticks
        if cfg.cross_check:
            self.join_tick[n:] = self.join_tick[:m]
        self.joined = np.zeros(n + m, dtype=bool)
        self.initial = int((~late).sum())
        opts = sender_config_options(cfg.sender_options)
        scfg = SenderConfig(
            session_id=7, deployment="simulate", group="239.255.0.1", port=5000, image_size=cfg.size,
            image_sha256=self.sha, symbol_size=cfg.symbol_size, block_symbols=cfg.block_symbols,
            fec=cfg.fec, repair_symbols=cfg.repair_symbols, expected_clients=n + m,
            start=StartPolicy(clients=self.initial), max_rate=cfg.rate, **opts)
        view = memoryview(self.image)
        self.sender = Sender(scfg, lambda off, size: view[off:off + size], 0.0)
        self.fleet_ids = [f"fleet{i:05d}" for i in range(n)]
        self.fleet: ReceiverFleet | None = None
        self.witnesses = [Witness(j, f"real{j}") for j in range(m)]
        self.uplink: deque[tuple[float, Message, tuple[str, int]]] = deque()
        self.fleet_statuses: dict[int, list[tuple[int, tuple]]] = {j: [] for j in range(m)} if cfg.cross_check else {}
        self.statuses = self.statuses_lost = self.dones = 0
        self.heartbeats = self.heartbeat_bytes = 0
        self.fleet_offer_mismatch = 0
        self.rate_min = math.inf
        self.rate_sum = self.rate_time = 0.0
        self.proactive_max = 0.0

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        wall0 = time.perf_counter()
        one_pass = cfg.size / cfg.rate
        max_time = cfg.max_time if cfg.max_time is not None else 30.0 + 20 * one_pass
        sender = self.sender
        tick_i = 0
        now = 0.0
        while now <= max_time:
            now = tick_i * cfg.tick
            self._joins(now, tick_i)
            while self.uplink and self.uplink[0][0] <= now:
                _, msg, addr = self.uplink.popleft()
                sender.handle_message(msg, addr, now)
            self._replies(now)
            sender.handle_timer(now)
            pkts = sender.datagrams_to_send(now, 4096)
            self._count_heartbeats(pkts)
            dgrams, masks = self.channel.deliveries(pkts)
            if self.fleet is not None:
                fm = masks[:, :self.n]
                for j, pkt in enumerate(dgrams):
                    self.fleet.receive_datagram(pkt, fm[j], now)
            for w in self.witnesses:
                if w.receiver is not None and not w.receiver.done:
                    self._witness_packets(w, dgrams, masks[:, self.n + w.index], now)
            self._feedback(now, tick_i)
            self._watch(tick_i)
            if sender.state == FINISHED and self._all_finished():
                break
            tick_i += 1
        return self._report(now, time.perf_counter() - wall0, one_pass)

    def _watch(self, tick_i: int) -> None:
        """Track the sender's adaptive decisions (send rate, proactive repair) while transferring."""
        s = self.sender
        if s.state != TRANSFERRING:
            return
        self.rate_min = min(self.rate_min, s.rate)
        self.rate_time += self.cfg.tick
        self.rate_sum += s.rate * self.cfg.tick
        if tick_i % 50 == 0:  # proactive_ratio looks at every client: sample it
            self.proactive_max = max(self.proactive_max, s.proactive_ratio)

    def _joins(self, now: float, tick_i: int) -> None:
        pending = ~self.joined & (self.join_at <= self.sender.source_symbols) & (self.join_tick <= tick_i)
        for col in np.flatnonzero(pending).tolist():
            self.joined[col] = True
            cid, addr = self._who(col)
            self.sender.handle_message(codec.decode(codec.encode(Join(client_id=cid))), addr, now)

    def _who(self, col: int) -> tuple[str, tuple[str, int]]:
        if col < self.n:
            return self.fleet_ids[col], ("fleet", col)
        return self.witnesses[col - self.n].client_id, ("real", col - self.n)

    def _replies(self, now: float) -> None:
        offered: list[int] = []
        for msg, addr in self.sender.replies():
            kind, i = addr  # type: ignore[misc]
            wire = codec.decode(codec.encode(msg))
            if kind == "fleet":
                if isinstance(wire, Offer):
                    if self.fleet is None:
                        self.fleet = ReceiverFleet(wire, self.n, image_sha256=self.sha, client_ids=self.fleet_ids)
                    elif wire != self.fleet.offer:
                        self.fleet_offer_mismatch += 1
                        continue
                    offered.append(i)
                elif self.fleet is not None:
                    self.fleet.handle_message(i, wire, now)
            else:
                w = self.witnesses[i]
                if isinstance(wire, Offer):
                    if w.receiver is None:
                        w.receiver = Receiver(wire, w.client_id, now)
                        w.out = bytearray(self.cfg.size)
                        w.joined_at = now
                elif w.receiver is not None:
                    w.receiver.handle_message(wire, now)
        if offered and self.fleet is not None:
            self.fleet.join(offered, now)

    def _count_heartbeats(self, pkts: list[bytes]) -> None:
        for pkt in pkts:
            if packets.HEADER.unpack_from(pkt)[2] == packets.KIND_HEARTBEAT:  # (magic, version, kind, ...)
                self.heartbeats += 1
                self.heartbeat_bytes += len(pkt)

    def _witness_packets(self, w: Witness, dgrams: list[bytes], mask: np.ndarray, now: float) -> None:
        r = w.receiver
        assert r is not None
        for j in np.flatnonzero(mask).tolist():
            try:
                got = r.receive_datagram(dgrams[j], now)
            except PacketError:
                w.rejected += 1
                continue
            if got is not None:
                off, data = got
                w.out[off:off + len(data)] = data

    def _feedback(self, now: float, tick_i: int) -> None:
        """Timers and the messages every receiver sends now (Status, Done), through a lossy uplink."""
        lost = self.channel.feedback_lost()
        out: list[tuple[int, Message]] = []
        if self.fleet is not None:
            out.extend(self.fleet.tick(now))
        for w in self.witnesses:
            r = w.receiver
            if r is None:
                continue
            r.handle_timer(now)
            while (ev := r.next_event()) is not None:
                if isinstance(ev, TransferComplete):
                    w.complete_at = now
                    digest = hashlib.sha256(w.out).hexdigest()
                    w.digest_ok = digest == self.sha
                    if w.digest_ok:
                        r.verified(digest, len(w.out), now - w.joined_at, now)
                    else:
                        r.fail("digest mismatch", now)
                    w.out = bytearray()  # verified: free the memory
                elif isinstance(ev, Acknowledged):
                    w.outcome, w.finished_at = ev.outcome, now
                elif isinstance(ev, GaveUp):
                    w.outcome, w.finished_at = "gave up: " + ev.reason, now
            out.extend((self.n + w.index, msg) for msg in r.datagrams_to_send(now))
        for col, msg in out:
            if isinstance(msg, Status):
                self.statuses += 1
                if self.cfg.cross_check and col < self.m:
                    self.fleet_statuses[col].append((tick_i, _status_key(msg)))
                elif self.cfg.cross_check and col >= self.n:
                    self.witnesses[col - self.n].statuses.append((tick_i, _status_key(msg)))
            elif isinstance(msg, Done):
                self.dones += 1
            if lost[col]:
                self.statuses_lost += isinstance(msg, Status)
                continue
            wire = codec.decode(codec.encode(msg))
            addr = self._who(col)[1]
            if self.cfg.rtt > 0:
                self.uplink.append((now + self.cfg.rtt, wire, addr))
            else:
                self.sender.handle_message(wire, addr, now)

    def _all_finished(self) -> bool:
        if self.fleet is None or not self.fleet.finished.all():
            return False
        return all(w.receiver is not None and w.receiver.done for w in self.witnesses)

    # ------------------------------------------------------------------ the report

    def _report(self, now: float, wall: float, one_pass: float) -> dict[str, Any]:
        cfg, s, fleet = self.cfg, self.sender, self.fleet
        n = self.n
        start = s.started_at if s.started_at is not None else 0.0
        image = cfg.size
        p_eff = self.channel.p_effective
        p_max = float(p_eff.max()) if p_eff.size else 0.0
        carried = np.maximum(self.channel.packets, 1)
        p_meas = self.channel.lost / carried
        bound = image / (1 - p_max) if p_max < 1 else math.inf
        payload = (s.source_symbols + s.repair_symbols + s.catchup_symbols) * cfg.symbol_size
        if fleet is not None:
            ok = fleet.state == ACKED
            done_times = np.sort(fleet.complete_at[ok & ~self.late[:n]] - start)
            completed = int(ok.sum())
            late_times = (fleet.complete_at[ok & self.late[:n]] - start).tolist()
            reasons = sorted({fleet.reason[i] for i in np.flatnonzero(~ok).tolist() if fleet.reason[i]})
            unfinished = int((~ok & ~fleet.finished).sum())
            if unfinished:
                reasons.insert(0, f"{unfinished} still receiving or reporting when the virtual time ran out")
        else:
            done_times, completed, late_times, reasons = np.zeros(0), 0, [], ["no receiver joined"]

        def pct(q: float) -> float | None:
            return round(float(np.percentile(done_times, q)), 4) if done_times.size else None

        witnesses_ok = [w.outcome == "done" and bool(w.digest_ok) for w in self.witnesses]
        result: dict[str, Any] = {
            "receivers": n,
            "completed": completed,
            "failed": n - completed,
            "failure_reasons": reasons[:5],
            "real_receivers": self.m,
            "real_completed": sum(witnesses_ok),
            "all_completed": completed == n and all(witnesses_ok),
            "image_bytes": image,
            "bytes_sent": s.bytes_sent,
            "payload_bytes": payload,
            "p_max": round(p_max, 6),
            "p_max_measured": round(float(p_meas.max()), 6) if p_meas.size else 0.0,
            "p_mean_measured": round(float(p_meas.mean()), 6) if p_meas.size else 0.0,
            "bound_bytes": round(bound),
            "overhead_vs_bound": round(s.bytes_sent / bound, 5),
            "payload_overhead_vs_bound": round(payload / bound, 5),
            "wire_vs_image": round(s.bytes_sent / image, 5) if image else None,
            "header_factor": round(s.bytes_sent / payload, 5) if payload else None,
            "source_symbols": s.source_symbols,
            "repair_symbols": s.repair_symbols,
            "catchup_symbols": s.catchup_symbols,
            "repair_share": round(s.repair_symbols / max(1, s.source_symbols), 5),
            "catchup_share": round(s.catchup_symbols / max(1, s.source_symbols), 5),
            "heartbeats": self.heartbeats,
            "heartbeat_bytes": self.heartbeat_bytes,
            "statuses": self.statuses,
            "statuses_lost": self.statuses_lost,
            "dones": self.dones,
            "one_pass_seconds": round(one_pass, 4),
            "rate_min_mbps": round(self.rate_min * 8 / 1e6, 1) if self.rate_time else None,
            "rate_mean_mbps": round(self.rate_sum / self.rate_time * 8 / 1e6, 1) if self.rate_time else None,
            "proactive_ratio_max": round(self.proactive_max, 4),
            "first_completion_s": pct(0),
            "median_completion_s": pct(50),
            "p90_completion_s": pct(90),
            "p99_completion_s": pct(99),
            "last_completion_s": pct(100),
            "late_joiner_completion_s": [round(t, 4) for t in late_times],
            "sim_seconds": round(now - start, 4),
            "sender_state": s.state,
            "peak_tracked_blocks": fleet.peak_tracked_blocks if fleet else 0,
            "bit_exact_checked": self.m,
            "bit_exact_ok": all(witnesses_ok),
            "real_outcomes": [w.outcome or "unfinished" for w in self.witnesses],
            "real_rejected_packets": sum(w.rejected for w in self.witnesses),
            "fleet_rejected_packets": int(fleet.rejected.sum()) if fleet else 0,
            "corrupted_deliveries": self.channel.corrupted,
            "corruption_check": "CRC-32 on every packet (accidents); tampering needs AEAD, not yet there",
        }
        if not cfg.burst and cfg.late_fraction is None and payload:  # the floor assumes independent loss, all there
            floor = self._floor_symbols(p_eff) * cfg.symbol_size
            result["block_code_floor_bytes"] = round(floor)
            result["floor_vs_bound"] = round(floor / bound, 5)
            result["protocol_vs_floor"] = round(payload / floor, 5)
        if cfg.cross_check:
            result.update(self._cross_check())
        result["config"] = {
            "loss_percent": [100 * cfg.loss[0], 100 * cfg.loss[1]],
            "burst": list(cfg.burst) if cfg.burst else None,
            "reorder": cfg.reorder, "duplicate": cfg.duplicate, "corrupt": cfg.corrupt,
            "late_join": [cfg.late_fraction, cfg.late_count] if cfg.late_fraction is not None else None,
            "rate_mbps": cfg.rate * 8 / 1e6, "block_symbols": cfg.block_symbols, "symbol_size": cfg.symbol_size,
            "fec": cfg.fec, "repair_symbols": self.sender.layout.repair_ids,
            "join_spread_ms": cfg.join_spread * 1000, "tick_ms": cfg.tick * 1000, "rtt_ms": cfg.rtt * 1000,
            "seed": cfg.seed,
            "sender_options": cfg.sender_options,
        }
        result["wall_seconds"] = round(wall, 2)
        return result

    def _floor_symbols(self, p: np.ndarray) -> float:
        layout = self.sender.layout
        ks: dict[int, int] = {}
        for b in range(layout.blocks):
            ks[layout.block_k(b)] = ks.get(layout.block_k(b), 0) + 1
        return sum(cnt * block_code_floor(p, k) for k, cnt in ks.items())

    def _cross_check(self) -> dict[str, Any]:
        mismatches = 0
        compared = 0
        first: str | None = None
        fleet = self.fleet
        for w in self.witnesses:
            a, b = self.fleet_statuses.get(w.index, []), w.statuses
            compared += len(a)
            if a != b:
                mismatches += 1
                if first is None:
                    diff = next((x, y) for x, y in zip([*a, None], [*b, None], strict=False) if x != y)
                    first = f"receiver {w.index}: fleet {diff[0]} vs real {diff[1]}"
            if fleet is None:
                continue
            t_fleet, t_real = float(fleet.complete_at[w.index]), w.complete_at
            if not (math.isnan(t_fleet) and math.isnan(t_real)) and not abs(t_fleet - t_real) <= self.cfg.tick * 1.001:
                mismatches += 1
                first = first or f"receiver {w.index}: completion at {t_fleet} (fleet) vs {t_real} (real)"
        return {"cross_check_ok": mismatches == 0, "cross_check_statuses": compared,
                "cross_check_mismatches": mismatches, "cross_check_first_difference": first}


def _status_key(msg: Status) -> tuple:
    return (msg.blocks_done, msg.loss_permille, msg.recv_kbps, tuple(tuple(r) for r in msg.needs))


# --------------------------------------------------------------------------- command line


def _percent_range(text: str) -> tuple[float, float]:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*%?\s*(?:-\s*(\d+(?:\.\d*)?)\s*%?)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a loss range: {text!r} (try 0-5 or 2)")
    lo = float(m.group(1)) / 100
    hi = float(m.group(2)) / 100 if m.group(2) else lo
    if not 0 <= lo <= hi < 1:
        raise argparse.ArgumentTypeError(f"loss must be 0 <= A <= B < 100 %: {text!r}")
    return lo, hi


def _percent(text: str) -> float:
    try:
        v = float(text.strip().rstrip("%")) / 100
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"percentage out of range: {text!r}")
    return v


def _burst(text: str) -> tuple[float, float]:
    try:
        p, length = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not P,LEN: {text!r} (try 0.5,20)") from None
    if not (0 < p < 100 and length >= 1):
        raise argparse.ArgumentTypeError(f"need 0 < P < 100 and LEN >= 1: {text!r}")
    return p / 100, length


def _late_join(text: str) -> tuple[float, int]:
    frac, _, count = text.partition(":")
    try:
        f = float(frac.strip().rstrip("%")) / (100 if frac.strip().endswith("%") else 1)
        c = int(count) if count else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"not FRACTION[:COUNT]: {text!r} (try 0.5:2)") from None
    if not (0 <= f <= 1 and c >= 1):
        raise argparse.ArgumentTypeError(f"need 0 <= FRACTION <= 1 and COUNT >= 1: {text!r}")
    return f, c


_TUNABLE = {f.name: f.default for f in dataclasses.fields(SenderConfig)
            if f.name in ("proactive_min", "proactive_max", "feedback_interval", "inflight_window",
                          "heartbeat_interval", "block_cache", "client_timeout", "join_window")}
_TUNABLE.update({f"rate.{f.name}": f.default for f in dataclasses.fields(RatePolicy)
                 if f.name in ("adaptive", "min_rate", "loss_ceiling", "decrease", "increase", "interval")})


def _sender_opt(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if key not in _TUNABLE:
        raise argparse.ArgumentTypeError(f"unknown sender option {key!r} (one of: {', '.join(_TUNABLE)})")
    default = _TUNABLE[key]
    try:
        if isinstance(default, bool):
            return key, value.strip().lower() in ("1", "true", "yes", "on")
        return key, (int if isinstance(default, int) else float)(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad value for {key}: {value!r}") from None


def sender_config_options(options: dict[str, Any]) -> dict[str, Any]:
    """``--sender-opt`` pairs as SenderConfig keyword arguments (``rate.*`` into a RatePolicy)."""
    out = {k: v for k, v in options.items() if not k.startswith("rate.")}
    rate = {k[5:]: v for k, v in options.items() if k.startswith("rate.")}
    if rate:
        out["rate"] = RatePolicy(**rate)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from controller.cli import parse_size

    p.add_argument("--receivers", type=int, default=100, help="receivers in the fleet model (default 100)")
    p.add_argument("--loss", type=_percent_range, default=(0.0, 0.05), metavar="A-B",
                   help="each receiver's loss rate, uniform in [A %%, B %%]; '2' means exactly 2 %% (default 0-5)")
    p.add_argument("--size", type=parse_size, default=16 * 1024 * 1024, help="image size (default 16MiB)")
    p.add_argument("--burst", type=_burst, metavar="P,LEN",
                   help="Gilbert-Elliott bursts: enter a burst with probability P %% per packet, "
                        "mean burst length LEN packets (all lost), per receiver; on top of --loss")
    p.add_argument("--reorder", type=_percent, default=0.0, metavar="PCT",
                   help="%% of packets each receiver gets 2-8 packets' time late")
    p.add_argument("--duplicate", type=_percent, default=0.0, metavar="PCT", help="%% of packets delivered twice")
    p.add_argument("--corrupt", type=_percent, default=0.0, metavar="PCT",
                   help="%% of packets arriving with one bit flipped anywhere (the CRC-32 must reject them; "
                        "tampering is detected only once packets are authenticated)")
    p.add_argument("--late-join", type=_late_join, metavar="FRACTION[:COUNT]",
                   help="COUNT receivers (default 1) join when the sender has sent FRACTION of the image; "
                        "the last real receiver joins late too")
    p.add_argument("--join-spread", type=float, default=500.0, metavar="MS",
                   help="the receivers that are not late join at random times over this span; the transfer starts "
                        "when all have joined (default 500 ms: report timers out of step, as in real life)")
    p.add_argument("--rate", type=float, default=1000.0, metavar="MBPS", help="virtual link rate (default 1000)")
    p.add_argument("--fec", choices=(FEC_RS16, FEC_RS), default=DEFAULT_FEC,
                   help=f"erasure code: {FEC_RS16} (Reed-Solomon over GF(2^16), k up to 32768) or {FEC_RS} (zfec, "
                        f"GF(2^8), k up to 255) (default {DEFAULT_FEC})")
    p.add_argument("--block-symbols", type=int, default=None, metavar="K",
                   help=f"source symbols per block, k (default {DEFAULT_K[FEC_RS16]} for {FEC_RS16}, "
                        f"{DEFAULT_K[FEC_RS]} for {FEC_RS})")
    p.add_argument("--repair-symbols", type=int, default=0, metavar="R",
                   help=f"{FEC_RS16} only: repair symbol ids per block (default: the power of two >= k, >= 64)")
    p.add_argument("--symbol-size", type=int, default=packets.DEFAULT_SYMBOL_SIZE, help="bytes per symbol")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-time", type=float, metavar="S",
                   help="give up after this much virtual time (default: 30 s + 20 passes)")
    p.add_argument("--tick", type=float, default=1.0, metavar="MS", help="virtual clock step (default 1 ms)")
    p.add_argument("--rtt", type=float, default=0.0, metavar="MS",
                   help="delay of feedback to the sender (default 0: within the tick)")
    p.add_argument("--real", type=int, default=4, metavar="N",
                   help="real Receiver objects beside the fleet, decoding and checking SHA-256; each holds the "
                        "image in memory (default 4)")
    p.add_argument("--cross-check", action="store_true",
                   help="the real receivers replay the first fleet receivers' channels; every status must match")
    p.add_argument("--sender-opt", type=_sender_opt, action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a SenderConfig field ({', '.join(_TUNABLE)})")
    p.add_argument("--json", action="store_true", help="last line of stdout: one JSON object of figures")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    late = args.late_join
    return SimConfig(
        receivers=args.receivers, loss=args.loss, burst=args.burst, reorder=args.reorder,
        duplicate=args.duplicate, corrupt=args.corrupt,
        late_fraction=late[0] if late else None, late_count=late[1] if late else 1,
        join_spread=args.join_spread / 1000,
        size=args.size, rate=args.rate * 1e6 / 8,
        block_symbols=args.block_symbols if args.block_symbols is not None else default_k(args.fec, args.symbol_size),
        fec=args.fec, repair_symbols=args.repair_symbols,
        symbol_size=args.symbol_size, seed=args.seed, max_time=args.max_time, tick=args.tick / 1000,
        rtt=args.rtt / 1000, real=args.real, cross_check=args.cross_check,
        sender_options=dict(args.sender_opt),
    )


def _print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def s(v: Any, unit: str = "") -> str:
        return "-" if v is None else f"{v:g}{unit}" if isinstance(v, float) else f"{v}{unit}"

    t = Table(title="mcdeploy simulate", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    c = r["config"]
    t.add_row("receivers", f"{r['receivers']} (+{r['real_receivers']} real), loss {c['loss_percent'][0]:g}-"
              f"{c['loss_percent'][1]:g} %, p_max {100 * r['p_max']:.2f} % "
              f"(measured {100 * r['p_max_measured']:.2f} %)")
    t.add_row("completed", f"{r['completed']}/{r['receivers']}; real bit-exact {r['real_completed']}/"
              f"{r['real_receivers']}" + (f"; failures: {'; '.join(r['failure_reasons'])}" if r["failed"] else ""))
    t.add_row("completion (s)", f"first {s(r['first_completion_s'])}, median {s(r['median_completion_s'])}, "
              f"p99 {s(r['p99_completion_s'])}, last {s(r['last_completion_s'])}; one pass {r['one_pass_seconds']:g}")
    if r["late_joiner_completion_s"]:
        t.add_row("late joiners (s)", ", ".join(f"{x:g}" for x in r["late_joiner_completion_s"][:10]))
    t.add_row("bytes sent", f"{r['bytes_sent']:,} (payload {r['payload_bytes']:,}; image {r['image_bytes']:,})")
    t.add_row("overhead vs bound", f"{r['overhead_vs_bound']:.4f} wire, {r['payload_overhead_vs_bound']:.4f} payload"
              f" (bound = image / (1 - p_max) = {r['bound_bytes']:,})")
    if "floor_vs_bound" in r:
        t.add_row("  of which", f"headers+CRC+heartbeats x{r['header_factor']:.4f}, block-code floor "
                  f"x{r['floor_vs_bound']:.4f}, protocol above floor x{r['protocol_vs_floor']:.4f}")
    t.add_row("symbols", f"source {r['source_symbols']:,}, repair {r['repair_symbols']:,} "
              f"({100 * r['repair_share']:.2f} %), catch-up {r['catchup_symbols']:,} "
              f"({100 * r['catchup_share']:.2f} %)")
    t.add_row("feedback", f"{r['statuses']:,} statuses ({r['statuses_lost']:,} lost), {r['dones']} done")
    t.add_row("sender", f"rate {s(r['rate_mean_mbps'])} Mbit/s mean, {s(r['rate_min_mbps'])} min "
              f"(max {c['rate_mbps']:g}); proactive repair up to {100 * r['proactive_ratio_max']:.1f} % of k")
    if "cross_check_ok" in r:
        t.add_row("cross-check", f"{'ok' if r['cross_check_ok'] else 'MISMATCH'}: {r['cross_check_statuses']} "
                  f"statuses compared" + (f"; {r['cross_check_first_difference']}" if not r["cross_check_ok"] else ""))
    t.add_row("time", f"virtual {r['sim_seconds']:g} s, wall {r['wall_seconds']:g} s")
    Console(width=140).print(t)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        sim = Simulation(cfg)
    except (ValueError, TypeError) as exc:
        print(f"mcdeploy: error: {exc}", file=sys.stderr)
        return 2
    result = sim.run()
    _print_table(result)
    if args.json:
        print(json.dumps(result), flush=True)
    ok = result["all_completed"] and result.get("cross_check_ok", True)
    return 0 if ok else 1
