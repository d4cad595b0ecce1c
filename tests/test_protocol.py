"""Stories for the sans-I/O sender and receiver on an in-memory lossy link (no sockets)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mcproto import packets
from mcproto.errors import PacketError
from mcproto.messages import Join
from mcproto.sender import FINISHED, RatePolicy, Sender, SenderConfig, StartPolicy
from tests.protocol_harness import VirtualClient, run_session

IMAGE = os.urandom(3 * 1024 * 1024 + 123)  # not a multiple of the symbol or block size
SS = packets.DEFAULT_SYMBOL_SIZE


def data_bytes(sender: Sender) -> int:
    return (sender.source_symbols + sender.repair_symbols + sender.catchup_symbols) * SS


def test_three_receivers_at_five_percent_loss_all_finish_bit_exact() -> None:
    clients = [VirtualClient(f"pc{i}", loss=0.05) for i in range(3)]
    sender, _ = run_session(IMAGE, clients, config={"expected_clients": 3, "max_rate": 100e6})
    assert sender.state == FINISHED
    for c in clients:
        assert c.outcome == "done"
        assert bytes(c.out) == IMAGE
    # Repair by "m more of block b", max over receivers: close to image / (1 - p).
    assert data_bytes(sender) <= 1.15 * len(IMAGE) / 0.95


def test_lossless_session_sends_source_plus_minimal_proactive_repair() -> None:
    clients = [VirtualClient("a", 0.0), VirtualClient("b", 0.0)]
    sender, _ = run_session(IMAGE, clients, config={"expected_clients": 2})
    assert all(bytes(c.out) == IMAGE for c in clients)
    assert sender.catchup_symbols == 0
    total = sender.layout.total_symbols
    assert sender.source_symbols == total
    assert sender.repair_symbols <= 0.02 * total + sender.layout.blocks  # the 1 % floor, rounded up per block
    assert all(c.receiver is not None and c.receiver.decoded_blocks == 0 for c in clients)


def test_late_joiner_at_half_finishes_one_partial_pass_later() -> None:
    rate = 5e6  # one pass = 0.63 s of virtual time, long against the 0.05-0.25 s feedback timers
    early = VirtualClient("early", 0.01)
    late = VirtualClient("late", 0.01, join_at=0.5 * len(IMAGE) / rate)
    sender, _ = run_session(IMAGE, [early, late], config={"expected_clients": 1, "join_window": 5.0,
                                                             "max_rate": rate})
    assert early.outcome == late.outcome == "done"
    assert bytes(late.out) == IMAGE
    assert sender.catchup_symbols + sender.repair_symbols > 0.4 * sender.layout.total_symbols
    one_pass = len(IMAGE) / rate
    # It missed half the image: it needs the first pass to end plus about half a pass more (and a few
    # feedback rounds for its own losses), not a full pass.
    assert late.finished_at - one_pass < 0.5 * one_pass + 0.25


def test_silent_client_is_dropped_and_the_session_still_ends() -> None:
    good = VirtualClient("good", 0.0)
    mute = VirtualClient("mute", 1.0)  # loses everything, including its own feedback
    sender, _ = run_session(IMAGE, [good, mute], config={"expected_clients": 2, "client_timeout": 2.0},
                            max_time=60)
    assert good.outcome == "done"
    assert sender.clients["mute"].state == "failed"
    assert "no feedback" in sender.clients["mute"].reason
    assert sender.state == FINISHED


def test_empty_and_tiny_images_complete() -> None:
    for image in (b"", b"x", os.urandom(SS + 1)):
        c = VirtualClient("a", 0.0)
        sender, _ = run_session(image, [c], config={"expected_clients": 1})
        assert c.outcome == "done" and bytes(c.out) == image and sender.state == FINISHED


def test_heavy_loss_is_still_bit_exact() -> None:
    clients = [VirtualClient(f"pc{i}", loss=0.2) for i in range(4)]
    sender, _ = run_session(IMAGE, clients, config={"expected_clients": 4, "max_rate": 100e6})
    assert all(c.outcome == "done" and bytes(c.out) == IMAGE for c in clients)
    assert sender.state == FINISHED
    assert sum(c.receiver.decoded_blocks for c in clients if c.receiver) > 0


def test_receiver_memory_stays_bounded_by_prompt_repair() -> None:
    image = os.urandom(40 * 1024 * 1024)
    rate = 50e6
    clients = [VirtualClient("pc", 0.05)]
    sender, _ = run_session(image, clients, config={"expected_clients": 1, "max_rate": rate})
    assert clients[0].outcome == "done"
    # Unfinished blocks held at once: about 0.2 s of data (feedback + repair latency), not the image.
    assert clients[0].max_partial * sender.layout.block_bytes <= 0.2 * rate
    assert clients[0].max_partial < 0.3 * sender.layout.blocks


@pytest.mark.parametrize("policy, joiners, expect_start", [
    (StartPolicy(clients=3), [0.0, 0.1, 0.2], 0.2),  # when N joined
    (StartPolicy(delay=0.5), [0.0], 0.5),  # after a delay
    (StartPolicy(at=0.3), [0.0], 0.3),  # at a time
    (StartPolicy(clients=5, delay=0.4), [0.0, 0.1], 0.4),  # whichever comes first
    (StartPolicy(), [0.25], 0.25),  # auto-cast: the first client starts it
])
def test_start_policies(policy: StartPolicy, joiners: list[float], expect_start: float) -> None:
    clients = [VirtualClient(f"c{i}", 0.0, join_at=t) for i, t in enumerate(joiners)]
    sender, _ = run_session(IMAGE[: 200_000], clients, start=policy,
                            config={"expected_clients": len(joiners)})
    assert sender.started_at is not None
    assert sender.started_at == pytest.approx(expect_start, abs=0.0025)
    assert all(c.outcome == "done" for c in clients)


@pytest.mark.parametrize("mutate", [
    lambda p: p[:10],
    lambda p: b"XX" + p[2:],
    lambda p: p[:2] + bytes([9]) + p[3:],
    lambda p: p + b"extra",
    lambda p: p[:3] + bytes([77]) + p[4:],
])
def test_malformed_packets_raise_packet_error(mutate) -> None:  # type: ignore[no-untyped-def]
    pkt = packets.encode_data(7, 0, 0, b"x" * 100)
    with pytest.raises(PacketError):
        packets.parse_header(mutate(pkt))


def test_sender_paces_to_max_rate() -> None:
    image = os.urandom(1_000_000)
    cfg = SenderConfig(session_id=1, deployment="d", group="g", port=1, image_size=len(image),
                       image_sha256="0" * 64, max_rate=1e6, expected_clients=1)
    s = Sender(cfg, lambda o, n: image[o:o + n], 0.0)
    s.handle_message(Join(client_id="c"), "c", 0.0)
    sent = 0
    t = 0.0
    while t < 0.5:
        sent += sum(len(p) for p in s.datagrams_to_send(t, 1000))
        t += 0.001
    # 0.5 s at 1 MB/s: 500 kB plus one burst of tokens and heartbeats.
    assert 450_000 <= sent <= 530_000


SLOW_IMAGE = os.urandom(16 * 1024 * 1024)
RATE = 16e6  # one pass = 1 s of virtual time


def _fleet(throttled: bool) -> list[VirtualClient]:
    clients = [VirtualClient(f"fast{i}", 0.01) for i in range(3)]
    if throttled:
        clients.append(VirtualClient("slow", 0.01, capacity=RATE / 10))
    return clients


def test_drop_policy_drops_a_throttled_client_and_the_others_barely_notice() -> None:
    policy = RatePolicy(slow_policy="drop", drop_below=RATE / 2, slow_grace=0.3, unicast_fallback=True)
    config = {"max_rate": RATE, "rate": policy}
    base = _fleet(throttled=False)
    run_session(SLOW_IMAGE, base, config={**config, "expected_clients": 3})
    clients = _fleet(throttled=True)
    sender, _ = run_session(SLOW_IMAGE, clients, config={**config, "expected_clients": 4})
    slow = clients[-1]
    assert slow.outcome.startswith("gave up: dropped by the DP: too slow")
    assert slow.receiver is not None and slow.receiver.unicast_allowed
    assert sender.clients["slow"].state == "failed" and "too slow" in sender.clients["slow"].reason
    for fast, ref in zip(clients[:3], base, strict=True):
        assert fast.outcome == "done" and bytes(fast.out) == SLOW_IMAGE
        assert fast.finished_at <= 1.2 * ref.finished_at


def test_hold_policy_slows_the_session_to_the_slowest_client() -> None:
    clients = _fleet(throttled=True)
    sender, _ = run_session(SLOW_IMAGE, clients, config={"max_rate": RATE, "expected_clients": 4,
                                                         "rate": RatePolicy(slow_policy="hold", min_rate=RATE / 20)},
                            max_time=120)
    assert all(c.outcome == "done" and bytes(c.out) == SLOW_IMAGE for c in clients)
    assert sender.rate < RATE / 2  # it adapted down towards the slow client's 1/10
    # Without adaptation the slow client would lose 90 % of a 40 MB/s stream; with it, the wire
    # carries far less than 10 passes' worth.
    assert sender.bytes_sent < 4 * len(SLOW_IMAGE)


@settings(max_examples=3000, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_any_single_byte_change_of_a_data_packet_is_rejected(pos: int, xor: int) -> None:
    pkt = bytearray(packets.encode_data(7, 3, 5, os.urandom(SS)))
    pkt[pos % len(pkt)] ^= xor
    with pytest.raises(PacketError):
        kind, session, block, esi, _ = packets.parse_header(bytes(pkt))
        # A change that still parses must at least not pass as the original packet of this session.
        if (kind, session, block, esi) != (packets.KIND_DATA, 7, 3, 5):
            raise PacketError("changed identity")


def test_tiers_move_a_throttled_client_to_a_slower_stream_where_it_finishes() -> None:
    policy = RatePolicy(drop_below=RATE / 2, slow_grace=0.3)
    config = {"max_rate": RATE, "rate": policy}
    base = _fleet(throttled=False)
    run_session(SLOW_IMAGE, base, config={**config, "expected_clients": 3})
    clients = _fleet(throttled=True)
    tiers = [("239.255.0.1", 5000, RATE), ("239.255.0.2", 5000, RATE / 3), ("239.255.0.3", 5000, RATE / 20)]
    session, _ = run_session(SLOW_IMAGE, clients, config={**config, "expected_clients": 4}, tiers=tiers,
                             max_time=60)
    slow = clients[-1]
    assert slow.outcome == "done" and bytes(slow.out) == SLOW_IMAGE
    assert slow.moves >= 1 and session.tier_of["slow"] >= 1  # it finished in a slower tier of its own
    assert session.tier_of["slow"] == 2  # 1/10 of the rate: too slow for 1/3, fine at 1/20
    for fast, ref in zip(clients[:3], base, strict=True):
        assert fast.outcome == "done" and bytes(fast.out) == SLOW_IMAGE
        assert fast.finished_at <= 1.2 * ref.finished_at
    assert session.state == FINISHED


def test_feedback_from_a_large_group_is_paced() -> None:
    """600 receivers at 5 % loss: the sender spreads their reports instead of taking 12,000 a second."""
    from mcproto import sender as sender_module

    image = os.urandom(1024 * 1024)
    clients = [VirtualClient(f"pc{i}", 0.05) for i in range(600)]
    counted: list[float] = []
    original = sender_module.Sender.handle_message

    def counting(self, msg, addr, now):  # type: ignore[no-untyped-def]
        if msg.type == "status":
            counted.append(now)
        return original(self, msg, addr, now)

    sender_module.Sender.handle_message = counting  # type: ignore[method-assign]
    try:
        sender, end = run_session(image, clients, config={"expected_clients": 600, "max_rate": 10e6}, step=0.002)
    finally:
        sender_module.Sender.handle_message = original  # type: ignore[method-assign]
    assert all(c.outcome == "done" and bytes(c.out) == image for c in clients)
    assert sender.feedback_interval > 2 * sender.config.feedback_interval
    transfer = [t for t in counted if sender.started_at is not None and t >= sender.started_at]
    per_second = len(transfer) / max(1e-9, end - (sender.started_at or 0))
    assert per_second < 600 / sender.config.feedback_interval / 2  # at least halved against 12,000/s


def test_a_waiting_session_without_clients_never_asks_for_a_timer_in_the_past() -> None:
    """A start delay that elapsed with nobody joined must not make the adapter spin."""
    cfg = SenderConfig(session_id=1, deployment="d", group="g", port=1, image_size=1000, image_sha256="0" * 64,
                       start=StartPolicy(delay=1.0))
    s = Sender(cfg, lambda o, n: bytes(n), 0.0)
    for now in (0.5, 1.5, 10.0):
        s.handle_timer(now)
        s.datagrams_to_send(now)
        assert s.get_timer() > now



def test_sealed_session_is_bit_exact_and_no_forged_packet_gets_in() -> None:
    """With a session key every packet is sealed; a forger on the group (one fake per real packet) gets nothing in."""
    key = os.urandom(32)
    rng = __import__("random").Random(3)

    def forge(pkt: bytes) -> bytes:
        b = bytearray(pkt)
        how = rng.randrange(3)
        if how == 0:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)  # bit flip
        elif how == 1:
            b[40:-16] = os.urandom(len(b) - 56)  # new payload, old tag
        else:
            return bytes(b[:rng.randrange(len(b))])  # truncated
        return bytes(b)

    clients = [VirtualClient(f"pc{i}", 0.02) for i in range(3)]
    sender, _ = run_session(IMAGE, clients, config={"expected_clients": 3, "max_rate": 100e6, "symbol_size": 1392},
                            key=key, forge=forge)
    assert all(c.outcome == "done" and bytes(c.out) == IMAGE for c in clients)
    assert all(c.rejected > 1000 for c in clients)
    # On the wire the payload is not the image.
    pkt = sender._packet(0, 0, sender._source(0)[0])
    assert IMAGE[:1392] not in pkt


def test_a_receiver_with_the_wrong_key_accepts_nothing() -> None:
    clients = [VirtualClient("good", 0.0)]
    sender, _ = run_session(IMAGE[:300_000], clients, config={"expected_clients": 1, "symbol_size": 1392},
                            key=os.urandom(32))
    assert clients[0].outcome == "done"
    from mcproto.messages import Offer
    from mcproto.receiver import Receiver

    offer = Offer(session_id=7, deployment="dep-1", group="g", port=1, image_size=300_000,
                  image_sha256="0" * 64, symbol_size=1392, block_symbols=128)
    wrong = Receiver(offer, "eve", 0.0, key=os.urandom(32))
    pkt = sender._packet(0, 0, sender._source(0)[0])
    with pytest.raises(PacketError, match="authentication"):
        wrong.receive_datagram(pkt, 0.0)


# --------------------------------------------------------------------------- both erasure codes

CODES = [
    pytest.param({"fec": "rs16", "block_symbols": 1024}, id="rs16-k1024"),
    # k not a power of two, few repair ids: repairs run out and cycle through the source ids (n_max = 364)
    pytest.param({"fec": "rs16", "block_symbols": 300, "repair_symbols": 64}, id="rs16-k300-r64"),
    pytest.param({"fec": "rs", "block_symbols": 128}, id="rs-k128"),
]


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("loss", [0.01, 0.05, 0.10])
def test_each_code_is_bit_exact_under_loss(code: dict, loss: float) -> None:
    clients = [VirtualClient(f"pc{i}", loss=loss) for i in range(3)]
    sender, _ = run_session(IMAGE, clients, seed=int(loss * 100), config={"expected_clients": 3, "max_rate": 100e6,
                                                                           **code})
    assert sender.layout.fec == code["fec"] and sender.layout.k == code["block_symbols"]
    assert sender.state == FINISHED
    for c in clients:
        assert c.outcome == "done" and bytes(c.out) == IMAGE
        r = c.receiver
        assert r is not None and r.offer.fec == code["fec"] and r.offer.repair_symbols == sender.layout.repair_ids
    assert sum(c.receiver.decoded_blocks for c in clients if c.receiver) > 0  # the decoder ran, not only source


def test_rs16_is_the_default_and_its_offer_carries_r() -> None:
    cfg = SenderConfig(session_id=1, deployment="d", group="g", port=1, image_size=len(IMAGE), image_sha256="0" * 64)
    s = Sender(cfg, lambda o, n: IMAGE[o:o + n], 0.0)
    s.handle_message(Join(client_id="c"), "c", 0.0)
    ((offer, _),) = s.replies()
    assert (offer.fec, offer.block_symbols, offer.repair_symbols) == ("rs16", 1024, 1024)
    last = s.layout.blocks - 1
    assert s.layout.n_max(0) == 2048 and s.layout.n_max(last) == s.layout.block_k(last) + 1024


def test_receiver_takes_symbol_ids_up_to_its_codes_n_max() -> None:
    from mcproto.messages import Offer
    from mcproto.receiver import Receiver

    base = {"session_id": 7, "deployment": "d", "group": "g", "port": 1, "image_size": 4 * 1400 * 1024,
            "image_sha256": "0" * 64, "symbol_size": 1400}
    wide = Receiver(Offer(**base, block_symbols=1024, fec="rs16", repair_symbols=512), "c", 0.0)
    wide.receive_datagram(packets.encode_data(7, 0, 1535, bytes(1400)), 0.0)  # k + R - 1: a repair id
    with pytest.raises(PacketError, match="symbol id"):
        wide.receive_datagram(packets.encode_data(7, 0, 1536, bytes(1400)), 0.0)
    narrow = Receiver(Offer(**base, block_symbols=128), "c", 0.0)
    with pytest.raises(PacketError, match="symbol id"):
        narrow.receive_datagram(packets.encode_data(7, 0, 256, bytes(1400)), 0.0)
    # Offers that a code cannot do are refused where they are decoded.
    from pydantic import ValidationError
    for bad in ({"block_symbols": 300}, {"block_symbols": 100, "repair_symbols": 8},
                {"block_symbols": 1024, "fec": "rs16"}, {"block_symbols": 1024, "fec": "rs16", "repair_symbols": 64,
                                                        "symbol_size": 1401}):
        with pytest.raises(ValidationError):
            Offer(**(base | bad))


@dataclass
class BurstyClient(VirtualClient):
    """Gilbert-Elliott loss: from the good state (loss ``loss``) a packet enters a burst with ``enter``; every
    packet of a burst is lost; a burst ends with ``1 / mean_burst`` per packet."""

    enter: float = 0.0
    mean_burst: float = 1.0
    _bad: bool = False

    def lose(self, rng: random.Random) -> bool:
        if self._bad:
            self._bad = rng.random() >= 1 / self.mean_burst
            return True
        self._bad = rng.random() < self.enter
        return rng.random() < self.loss


@settings(max_examples=12, deadline=None)
@example(fec=("rs16", 1024, 0), size=85401, loss=0.0, enter=0.01, mean_burst=40.0, seed=61996)  # a 15 s+ burst
@given(fec=st.sampled_from([("rs16", 1024, 0), ("rs16", 97, 64), ("rs16", 513, 128), ("rs", 128, 0), ("rs", 200, 0)]),
       size=st.integers(min_value=1, max_value=900_000), loss=st.floats(min_value=0.0, max_value=0.2),
       enter=st.sampled_from([0.0, 0.002, 0.01]), mean_burst=st.sampled_from([2.0, 10.0, 40.0]),
       seed=st.integers(min_value=0, max_value=2**16))
def test_property_any_loss_pattern_is_bit_exact(fec: tuple[str, int, int], size: int, loss: float, enter: float,
                                                mean_burst: float, seed: int) -> None:
    """Both codes, any k (a short last block too), independent and bursty loss: every receiver gets the image."""
    code, k, r = fec
    image = random.Random(seed).randbytes(size)
    clients = [BurstyClient(f"pc{i}", loss=loss * i / 2, enter=enter, mean_burst=mean_burst) for i in range(3)]
    sender, _ = run_session(image, clients, seed=seed, max_time=60,
                            config={"expected_clients": 3, "max_rate": 50e6, "fec": code, "block_symbols": k,
                                    "repair_symbols": r,
                                    # A burst can silence a client both ways for many seconds when little is
                                    # sent (mean 40 packets ≈ 6 s of heartbeats); the sender rightly fails a
                                    # client unheard for 15 s, but this property is about the data: wait it out.
                                    "client_timeout": 120.0})
    assert sender.state == FINISHED
    assert all(c.outcome == "done" and bytes(c.out) == image for c in clients), [c.outcome for c in clients]
