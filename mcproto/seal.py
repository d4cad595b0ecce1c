"""Authenticated, encrypted data packets (packet format version 2): the building block for issue 4.

Pure: computation only (``cryptography``'s ChaCha20-Poly1305; no clock, no sockets).  The
sender and receiver use it when a session has a key (standalone send/receive with a shared key
today; DP sessions once the per-session key reaches clients over the session plane); without a
key they speak version 1 (CRC-32 against accidents only).

Why ChaCha20-Poly1305: constant-time and fast everywhere, including WinPE machines and VMs that
do not expose AES-NI.  Nonces never repeat for a key: a nonce is (epoch, counter) where the
epoch is the sender instance's fencing number from its session lease (a Redis counter, so a
restarted or re-dispatched sender always has a new one) and the counter counts that instance's
packets.  The whole header is authenticated (AEAD associated data), so no field can be changed
without detection, and a packet sealed under another session's key fails.

Header v2, network byte order (40 bytes)::

    | "MC" | ver=2 | kind | flags | tag_len=16 | payload_len | session u64 | block u32 | symbol u32 |
    | epoch u32 | counter u64 |

followed by the encrypted payload and the 16-byte Poly1305 tag.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mcproto.errors import ForeignPacket, PacketError
from mcproto.packets import KIND_ANNOUNCE, KIND_DATA, KIND_HEARTBEAT, MAGIC

VERSION = 2
HEADER = struct.Struct("!2sBBBBHQIIIQ")
HEADER_SIZE = HEADER.size  # 40
TAG_LEN = 16
OVERHEAD = HEADER_SIZE + TAG_LEN  # 56: symbols of 1,392 bytes keep an IPv6 datagram within a 1,500-byte MTU
KEY_LEN = 32


class PacketSealer:
    """Seals one sender instance's packets; the caller owns uniqueness of ``epoch`` per key."""

    def __init__(self, key: bytes, epoch: int) -> None:
        if len(key) != KEY_LEN:
            raise ValueError("session keys are 32 bytes")
        if not 0 <= epoch < 2**32:
            raise ValueError("epoch must fit 32 bits")
        self._aead = ChaCha20Poly1305(key)
        self.epoch = epoch
        self.counter = 0

    def seal(self, kind: int, session_id: int, block: int, symbol: int, payload: bytes | memoryview) -> bytes:
        if self.counter >= 2**64 - 1:
            raise PacketError("nonce space of this epoch exhausted: start a new sender instance")
        counter = self.counter
        self.counter += 1
        header = HEADER.pack(MAGIC, VERSION, kind, 0, TAG_LEN, len(payload), session_id, block, symbol,
                             self.epoch, counter)
        nonce = struct.pack("!IQ", self.epoch, counter)
        return header + self._aead.encrypt(nonce, bytes(payload), header)


class PacketOpener:
    """Opens packets of one session key; everything that does not authenticate is a PacketError."""

    def __init__(self, key: bytes, session_id: int | None) -> None:
        """``session_id`` None accepts any session (discovery, where the announce names it)."""
        if len(key) != KEY_LEN:
            raise ValueError("session keys are 32 bytes")
        self._aead = ChaCha20Poly1305(key)
        self.session_id = session_id
        self.rejected = 0
        self.last_session = 0

    def open(self, data: bytes | bytearray | memoryview) -> tuple[int, int, int, bytes]:
        """(kind, block, symbol, payload) of an authentic packet of our session."""
        try:
            if len(data) < HEADER_SIZE + TAG_LEN:
                raise PacketError("short packet")
            magic, ver, kind, _flags, tag_len, plen, session, block, symbol, epoch, counter = \
                HEADER.unpack_from(data)
            if magic != MAGIC or ver != VERSION or tag_len != TAG_LEN:
                raise PacketError("not a v2 packet")
            if kind not in (KIND_DATA, KIND_HEARTBEAT, KIND_ANNOUNCE):
                raise PacketError("unknown packet kind")
            if HEADER_SIZE + plen + TAG_LEN != len(data):
                raise PacketError("length mismatch")
            if self.session_id is not None and session != self.session_id:
                raise ForeignPacket("packet of another session")
            view = memoryview(data)
            header = bytes(view[:HEADER_SIZE])
            try:
                payload = self._aead.decrypt(struct.pack("!IQ", epoch, counter), bytes(view[HEADER_SIZE:]), header)
            except InvalidTag:
                raise PacketError("authentication failed") from None
            self.last_session = session
            return kind, block, symbol, payload
        except PacketError:
            self.rejected += 1
            raise


def session_key(shared_key: bytes, session_id: int) -> bytes:
    """The key of one session derived from a pre-shared key (standalone send/receive).

    Every session gets its own key (HKDF-SHA256 over its random 64-bit id), so nonces (epoch,
    counter) restarting at zero in a new session never meet an old key.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(shared_key) < 16:
        raise ValueError("a shared key needs at least 16 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=session_id.to_bytes(8, "big"),
                info=b"mcdeploy packet key v2").derive(shared_key)
