"""Binary data-plane packets: what the DP sends on the multicast group.

Pure: no I/O.  Image bytes are not coordination messages, so they are not
msgpack: a fixed 24-byte header, the payload, and room for an authentication
tag (``tag_len`` bytes after the payload; 0 until packets are authenticated).

Every packet ends with a 4-byte CRC-32 of header + payload in the tag space
(the AEAD tag replaces it when packets are authenticated).

Header, network byte order::

    0      2    3     4      5        6            8           16      20       24
    | "MC" | ver | kind | flags | tag_len | payload_len | session | block | symbol |

* DATA: ``block`` and ``symbol`` (the erasure-code symbol id, ESI: 0..k-1 are
  source symbols, k..255 repair symbols; see :mod:`mcproto.fec`); the payload
  is one symbol of exactly the negotiated symbol size.
* ANNOUNCE: payload is a msgpack :class:`mcproto.messages.Announce` (decoded
  with the one codec): where the session's control port is, so a receiver that
  knows only the group can find it (standalone ``mcdeploy receive``, discovery).
* HEARTBEAT: payload is ``!QQBH`` = (total blocks, blocks the first pass has
  sent, flags, feedback interval in ms).  Receivers learn from it how far the sender got, so they can
  ask for blocks whose every packet was lost (the tail, a late join).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from mcproto.errors import PacketError

MAGIC = b"MC"
PACKET_VERSION = 1
KIND_DATA = 1
KIND_HEARTBEAT = 2
KIND_ANNOUNCE = 3

HEADER = struct.Struct("!2sBBBBHQII")
HEADER_SIZE = HEADER.size  # 24
HEARTBEAT_BODY = struct.Struct("!QQBH")
CRC = struct.Struct("!I")
CRC_LEN = CRC.size

HB_END_OF_PASS = 0x01  # the sender has sent every symbol at least once
HB_FINISHED = 0x02  # the session is over; receivers still incomplete should give up

# 1,400-byte payloads + 24-byte header + 8 UDP + 40 IPv6 = 1,472 < 1,500 MTU:
# never rely on IP fragmentation, which is ruinous under loss.
DEFAULT_SYMBOL_SIZE = 1400


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sender progress announced on the group."""

    session_id: int
    total_blocks: int
    sent_through: int
    flags: int
    feedback_ms: int  # how often receivers should report: the sender spreads a large group's feedback


def _sealed(kind: int, session_id: int, block: int, symbol: int, payload: bytes | memoryview) -> bytes:
    pkt = HEADER.pack(MAGIC, PACKET_VERSION, kind, 0, CRC_LEN, len(payload), session_id, block, symbol) + payload
    return pkt + CRC.pack(zlib.crc32(pkt))


def encode_data(session_id: int, block: int, symbol: int, payload: bytes | memoryview) -> bytes:
    """One DATA datagram; the caller guarantees ``payload`` fits the negotiated symbol size."""
    return _sealed(KIND_DATA, session_id, block, symbol, payload)


def encode_heartbeat(session_id: int, total_blocks: int, sent_through: int, flags: int,
                     feedback_ms: int = 50) -> bytes:
    """One HEARTBEAT datagram."""
    return _sealed(KIND_HEARTBEAT, session_id, 0, 0,
                   HEARTBEAT_BODY.pack(total_blocks, sent_through, flags, min(65535, feedback_ms)))


def encode_announce(session_id: int, body: bytes) -> bytes:
    """One ANNOUNCE datagram carrying an already encoded ``Announce`` message."""
    return _sealed(KIND_ANNOUNCE, session_id, 0, 0, body)


def parse_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]:
    """Validate framing; returns (kind, session_id, block, symbol, payload_len).

    Raises :class:`PacketError` for anything that is not a well-formed packet of
    our version.  The payload is ``data[HEADER_SIZE:HEADER_SIZE + payload_len]``.
    """
    if len(data) < HEADER_SIZE:
        raise PacketError(f"short packet ({len(data)} bytes)")
    magic, ver, kind, _flags, tag_len, plen, session, block, symbol = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PacketError("bad magic")
    if ver != PACKET_VERSION:
        raise PacketError(f"unsupported packet version {ver}")
    if kind not in (KIND_DATA, KIND_HEARTBEAT, KIND_ANNOUNCE):
        raise PacketError(f"unknown packet kind {kind}")
    if HEADER_SIZE + plen + tag_len != len(data):
        raise PacketError("length mismatch")
    # Until packets carry an AEAD tag, every packet carries a CRC-32 in the tag space: a damaged
    # packet (a bad NIC, a buggy middlebox, a UDP checksum of 0) is dropped, never written.
    if tag_len != CRC_LEN:
        raise PacketError("packet without checksum")
    end = HEADER_SIZE + plen
    if CRC.unpack_from(data, end)[0] != zlib.crc32(memoryview(data)[:end]):
        raise PacketError("checksum mismatch")
    return kind, session, block, symbol, plen


def parse_heartbeat(session_id: int, payload: bytes | memoryview) -> Heartbeat:
    """Decode a HEARTBEAT payload."""
    if len(payload) != HEARTBEAT_BODY.size:
        raise PacketError("bad heartbeat length")
    total, sent, flags, feedback_ms = HEARTBEAT_BODY.unpack(payload)
    if sent > total:
        raise PacketError("heartbeat beyond end of image")
    return Heartbeat(session_id, total, sent, flags, max(5, feedback_ms))
