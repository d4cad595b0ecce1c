"""Fuzzing every decoder of untrusted input: no crash, no hang, only the documented error type.

The codec's own fuzz tests live in test_codec.py; here the rest: the data-packet parsers (v1 and
sealed v2), the receiver fed arbitrary datagrams, the signed manifest and its unverified parse,
the resume journal read from arbitrary files, and the DP's control port.  Hypothesis drives
structured mutations of valid inputs as well as random bytes; every example is bounded in size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clientagent import integrity
from clientagent import journal as journal_mod
from mcproto import manifest as mf
from mcproto import packets, seal
from mcproto.errors import PacketError
from mcproto.messages import Offer
from mcproto.receiver import Receiver

KEY = bytes(range(32))
SESSION = 77
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _offer(size: int = 50_000, encrypted: bool = False) -> Offer:
    return Offer(session_id=SESSION, deployment="d", group="239.255.77.1", port=5000, image_size=size,
                 image_sha256="0" * 64, symbol_size=1000, block_symbols=8, encrypted=encrypted)


def _valid_packets() -> list[bytes]:
    sealer = seal.PacketSealer(KEY, 3)
    return [
        packets.encode_data(SESSION, 1, 2, os.urandom(1000)),
        packets.encode_heartbeat(SESSION, 7, 3, 0, 50),
        packets.encode_announce(SESSION, b"\x81\xa4type\xa8announce"),
        sealer.seal(packets.KIND_DATA, SESSION, 1, 2, os.urandom(1000)),
        sealer.seal(packets.KIND_HEARTBEAT, SESSION, 0, 0, os.urandom(21)),
    ]


@st.composite
def mutated(draw: st.DrawFn, base: list[bytes]) -> bytes:
    """A valid packet with flips, truncation, extension or splices; or pure random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=2000))
    data = bytearray(draw(st.sampled_from(base)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 3))
        if op == 0 and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == 1:
            del data[draw(st.integers(0, len(data))):]
        elif op == 2:
            data += draw(st.binary(max_size=64))
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(max_size=16))
    return bytes(data)


BASE = _valid_packets()


@FUZZ
@given(mutated(BASE))
def test_v1_parser_raises_only_packet_error(data: bytes) -> None:
    try:
        kind, session, _block, _esi, plen = packets.parse_header(data)
    except PacketError:
        return
    assert plen <= len(data) - packets.HEADER_SIZE  # what it accepts it can slice safely
    if kind == packets.KIND_HEARTBEAT:
        try:
            packets.parse_heartbeat(session, data[packets.HEADER_SIZE:packets.HEADER_SIZE + plen])
        except PacketError:
            pass


@FUZZ
@given(mutated(BASE))
def test_sealed_opener_accepts_nothing_but_intact_packets(data: bytes) -> None:
    opener = seal.PacketOpener(KEY, SESSION)
    try:
        opener.open(data)
    except PacketError:
        return
    assert data in BASE  # only an unmodified sealed packet authenticates


@FUZZ
@given(st.lists(mutated(BASE), max_size=40), st.booleans())
def test_a_receiver_fed_garbage_raises_only_packet_error_and_writes_nothing_forged(
        datagrams: list[bytes], sealed: bool) -> None:
    rx = Receiver(_offer(encrypted=sealed), "fuzz", 0.0, key=KEY if sealed else None)
    for i, d in enumerate(datagrams):
        try:
            written = rx.receive_datagram(d, i * 0.01)
        except PacketError:
            continue
        assert written is None  # no block can complete from fewer than k=8 distinct symbols here
    rx.handle_timer(1.0)
    rx.datagrams_to_send(1.0)


def _signed_manifest() -> tuple[bytes, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    data = os.urandom(9000)
    m = mf.build("img", [data[i:i + 4096] for i in range(0, len(data), 4096)], 4096)
    return mf.sign(m, key), key


MANIFEST, MANIFEST_KEY = _signed_manifest()


@FUZZ
@given(mutated([MANIFEST]))
def test_manifest_decoders_raise_only_their_errors(blob: bytes) -> None:
    try:
        m = mf.verify(blob, MANIFEST_KEY.public_key())
        assert blob == MANIFEST and m.size == 9000
    except mf.ManifestError:
        pass
    try:
        integrity.parse_unverified(blob)
    except integrity.IntegrityError:
        pass


@FUZZ
@given(st.dictionaries(st.text(max_size=12), st.one_of(
    st.integers(-2**63, 2**64 - 1), st.binary(max_size=40), st.text(max_size=20), st.none(),
    st.lists(st.integers(0, 2**32), max_size=3)), max_size=10))
def test_manifest_with_arbitrary_signed_fields_is_refused_cleanly(fields: dict) -> None:
    """Even a correctly *signed* blob with nonsense inside is one ManifestError (a buggy signer)."""
    body = msgpack.packb(fields, use_bin_type=True)
    blob = msgpack.packb({"manifest": body, "sig": MANIFEST_KEY.sign(body)}, use_bin_type=True)
    with pytest.raises(mf.ManifestError):
        mf.verify(blob, MANIFEST_KEY.public_key())


def _journal_bytes(tmp: Path) -> bytes:
    path = tmp / "seed.journal"
    ident = journal_mod.identity(hashlib.sha256(b"x").hexdigest(), 10_000, 1000, 8, str(tmp / "out"), 10_000)
    j = journal_mod.Journal.create(str(path), ident)
    j.append([0, 1, 5])
    j.sync()
    j.close()
    return path.read_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_journal_of_any_content_reads_as_a_result_never_a_crash(tmp_path: Path, data: st.DataObject) -> None:
    seed = _journal_bytes(tmp_path)
    content = data.draw(mutated([seed]))
    path = tmp_path / "fuzz.journal"
    path.write_bytes(content)
    found = journal_mod.read(str(path))
    if found.identity is None:
        assert found.problem  # unusable journals say why
    else:
        assert all(isinstance(b, int) and b >= 0 for b in found.blocks)
        if content != seed:
            assert found.blocks <= {0, 1, 5}  # damage can only lose claims, never add them


def test_the_dp_control_port_survives_any_datagram() -> None:
    """The host's decode-and-route path never raises, whatever arrives (it is fed directly here)."""
    from dpagent.host import SessionHost

    host = SessionHost("fuzz-dp", "127.0.0.1", 0)
    try:
        rng = __import__("random").Random(5)
        samples = [os.urandom(rng.randrange(0, 1500)) for _ in range(2000)]
        samples += [msgpack.packb({"type": t, "version": 1, "session_id": rng.randrange(2**64), "client_id": "x",
                                   "offset": rng.randrange(-5, 10**9)}) for t in
                    ("join", "status", "done", "failed", "manifest_get", "offer", "ack", "nope") for _ in range(50)]
        for d in samples:
            host.handle_datagram(d, ("127.0.0.1", 9))
        assert host.bad_datagrams >= len(samples) - 100  # nearly all are refused (some joins get NoSession)
    finally:
        host.stop()
