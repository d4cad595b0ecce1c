"""Packet sealing (format v2): known answers for the AEAD glue, and no forged packet accepted."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from mcproto.errors import PacketError
from mcproto.packets import KIND_DATA
from mcproto.seal import HEADER_SIZE, TAG_LEN, PacketOpener, PacketSealer

KEY = os.urandom(32)
SESSION = 0x1234_5678_9ABC_DEF0


def test_rfc8439_chacha20_poly1305_known_answer() -> None:
    """RFC 8439 section 2.8.2: the AEAD our packets rely on computes the published answer."""
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
                 b"sunscreen would be it.")
    out = ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
    assert out[-16:] == bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")
    assert out[:16] == bytes.fromhex("d31a8d34648e60db7b86afbc53ef7ec2")


def test_round_trip_and_nonces_never_repeat() -> None:
    sealer = PacketSealer(KEY, epoch=7)
    opener = PacketOpener(KEY, SESSION)
    payloads = [os.urandom(1400) for _ in range(50)]
    packets = [sealer.seal(KIND_DATA, SESSION, 3, i, p) for i, p in enumerate(payloads)]
    nonces = {p[HEADER_SIZE - 12:HEADER_SIZE] for p in packets}
    assert len(nonces) == len(packets)
    for i, (pkt, payload) in enumerate(zip(packets, payloads, strict=True)):
        assert pkt[HEADER_SIZE:HEADER_SIZE + 1400] != payload  # encrypted on the wire
        assert opener.open(pkt) == (KIND_DATA, 3, i, payload)


def test_wrong_key_other_session_and_garbage_are_rejected_and_counted() -> None:
    pkt = PacketSealer(KEY, 1).seal(KIND_DATA, SESSION, 0, 0, b"x" * 100)
    for opener, data in [
        (PacketOpener(os.urandom(32), SESSION), pkt),  # wrong key
        (PacketOpener(KEY, SESSION + 1), pkt),  # replayed from another session
        (PacketOpener(KEY, SESSION), os.urandom(200)),  # random
        (PacketOpener(KEY, SESSION), pkt[:-1]),  # truncated
    ]:
        with pytest.raises(PacketError):
            opener.open(data)
        assert opener.rejected == 1


@settings(max_examples=3000, deadline=None)
@given(st.data())
def test_no_mutation_of_a_sealed_packet_is_accepted(data: st.DataObject) -> None:
    pkt = bytearray(PacketSealer(KEY, 9).seal(KIND_DATA, SESSION, 5, 17, os.urandom(64)))
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "swap-tag"]))
    if how == "flip":
        pos = data.draw(st.integers(0, len(pkt) - 1))
        pkt[pos] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del pkt[data.draw(st.integers(0, len(pkt) - 1)):]
    elif how == "extend":
        pkt += data.draw(st.binary(min_size=1, max_size=32))
    else:
        pkt[-TAG_LEN:] = os.urandom(TAG_LEN)
    with pytest.raises(PacketError):
        PacketOpener(KEY, SESSION).open(bytes(pkt))


def test_a_million_forged_packets_none_accepted() -> None:
    """Target from the issue: 0 of 10^6 forged packets accepted (random, bit-flipped, truncated, wrong key)."""
    opener = PacketOpener(KEY, SESSION)
    good = PacketSealer(KEY, 3).seal(KIND_DATA, SESSION, 1, 2, os.urandom(1400))
    wrong_key = PacketSealer(os.urandom(32), 3)
    accepted = 0
    header = bytearray(good[:HEADER_SIZE])
    for i in range(1_000_000):
        kind = i % 4
        if kind == 0:  # header-valid forgery with random ciphertext and tag
            struct.pack_into("!Q", header, HEADER_SIZE - 8, i)
            forged = bytes(header) + os.urandom(len(good) - HEADER_SIZE) if i % 1000 == 0 else \
                bytes(header) + good[HEADER_SIZE:]
        elif kind == 1:  # bit flip somewhere
            b = bytearray(good)
            b[i % len(b)] ^= 1 << (i % 8)
            forged = bytes(b)
        elif kind == 2:  # truncated
            forged = good[: i % len(good)]
        else:  # a real packet sealed under another key
            forged = wrong_key.seal(KIND_DATA, SESSION, 1, 2, b"evil") if i % 1000 == 3 else good[:-1] + b"\x00"
        try:
            opener.open(forged)
            accepted += 1
        except PacketError:
            pass
    assert accepted == 0
    assert opener.rejected == 1_000_000
