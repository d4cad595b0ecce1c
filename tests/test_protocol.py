"""Stories for the sans-I/O sender and receiver on an in-memory lossy link (no sockets)."""

from __future__ import annotations

import os

import pytest

from mcproto import packets
from mcproto.errors import PacketError
from mcproto.sender import FINISHED, Sender, SenderConfig
from tests.protocol_harness import VirtualClient, run_session

IMAGE = os.urandom(3 * 1024 * 1024 + 123)  # not a multiple of the symbol size


def test_three_receivers_at_five_percent_loss_all_finish_bit_exact() -> None:
    clients = [VirtualClient(f"pc{i}", loss=0.05) for i in range(3)]
    sender, _ = run_session(IMAGE, clients, config={"expected_clients": 3, "max_rate": 100e6})
    assert sender.state == FINISHED
    for c in clients:
        assert c.outcome == "done"
        assert bytes(c.out) == IMAGE
    # NAK repair sends only what was lost somewhere: about 1 - (0.95 ** 3) = 14 % extra at most.
    data_bytes = sender.data_packets * packets.DEFAULT_SYMBOL_SIZE
    assert data_bytes <= 1.25 * len(IMAGE)


def test_lossless_session_sends_each_symbol_once() -> None:
    clients = [VirtualClient("a", 0.0), VirtualClient("b", 0.0)]
    sender, _ = run_session(IMAGE, clients, config={"expected_clients": 2})
    assert all(bytes(c.out) == IMAGE for c in clients)
    assert sender.repair_packets == 0
    assert sender.data_packets == sender.config.total_symbols


def test_late_joiner_gets_what_it_missed_in_the_next_pass() -> None:
    early = VirtualClient("early", 0.01)
    late = VirtualClient("late", 0.01, join_at=0.05)
    sender, _ = run_session(IMAGE, [early, late], config={"expected_clients": 1, "start_timeout": 5.0,
                                                           "max_rate": 30e6})
    assert early.outcome == late.outcome == "done"
    assert bytes(late.out) == IMAGE
    assert sender.repair_packets > 0


def test_silent_client_is_dropped_and_the_session_still_ends() -> None:
    good = VirtualClient("good", 0.0)
    mute = VirtualClient("mute", 1.0)  # loses everything, including its own feedback
    sender, _ = run_session(IMAGE, [good, mute], config={"expected_clients": 2, "client_timeout": 2.0},
                            max_time=60)
    assert good.outcome == "done"
    assert sender.clients["mute"].state == "failed"
    assert "no feedback" in sender.clients["mute"].reason
    assert sender.state == FINISHED


def test_empty_image_completes() -> None:
    c = VirtualClient("a", 0.0)
    sender, _ = run_session(b"", [c], config={"expected_clients": 1})
    assert c.outcome == "done" and sender.state == FINISHED


@pytest.mark.parametrize("mutate", [
    lambda p: p[:10],
    lambda p: b"XX" + p[2:],
    lambda p: p[:2] + bytes([9]) + p[3:],
    lambda p: p + b"extra",
    lambda p: p[:3] + bytes([77]) + p[4:],
])
def test_malformed_packets_raise_packet_error(mutate) -> None:
    pkt = packets.encode_data(7, 0, 0, b"x" * 100)
    with pytest.raises(PacketError):
        packets.parse_header(mutate(pkt))


def test_sender_paces_to_max_rate() -> None:
    image = os.urandom(1_000_000)
    cfg = SenderConfig(session_id=1, deployment="d", group="g", port=1, image_size=len(image),
                       image_sha256="0" * 64, max_rate=1e6, expected_clients=1)
    s = Sender(cfg, lambda o, n: image[o:o + n], 0.0)
    from mcproto.messages import Join
    s.handle_message(Join(client_id="c"), "c", 0.0)
    sent = 0
    t = 0.0
    while t < 0.5:
        sent += sum(len(p) for p in s.datagrams_to_send(t, 1000))
        t += 0.001
    # 0.5 s at 1 MB/s: 500 kB plus one burst of tokens and heartbeats.
    assert 450_000 <= sent <= 530_000
