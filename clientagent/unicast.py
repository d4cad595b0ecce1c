"""Unicast fallback, client side: fetch the blocks a receive still lacks from the DP over HTTP.

Portable: ``http.client`` + ``urllib.parse`` only (and ``cryptography``, which the client already
needs), so it runs in WinPE as well as on Linux.  A client falls back when the DP dropped it from
the multicast session and said unicast is allowed, when ``--unicast`` forces it, or when the group
cannot be joined or stays silent and the deployment allows fallback (its offer names an
``http_url``).  The DP serves ``GET /sessions/<id>/image`` with ``Range: bytes=a-b`` to clients that
send the token their (DP-signed) offer gave them (:data:`TOKEN_HEADER`, :data:`CLIENT_HEADER`).

Only the missing blocks are asked for, in runs of contiguous blocks (at most :data:`MAX_RANGE`
bytes per request), and every block goes through the same
:class:`clientagent.integrity.CheckedWriter` as multicast data: nothing is committed before the
manifest chunks it touches check, so the journal and resume work across a fallback.

Sealed sessions: the DP encrypts the body with ChaCha20 under a key derived from the session key
(:func:`crypt`), so the image crosses the network as confidential as on the multicast path; the
manifest checks (and the final SHA-256) give integrity.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import struct
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

TOKEN_HEADER = "X-Mcdeploy-Token"
CLIENT_HEADER = "X-Mcdeploy-Client"
ENCRYPTED_HEADER = "X-Mcdeploy-Encrypted"
MAX_RANGE = 64 * 1024 * 1024  # bytes per request: few round trips, and a retry costs little
READ_BYTES = 1024 * 1024
PIECE = 1024 * 1024  # cipher pieces are aligned to this (never crossing a counter segment)


class UnicastError(Exception):
    """The HTTP fetch failed (refused, unreachable, short); the reason is one line."""


def token(secret: bytes, session_id: int, client_id: str) -> str:
    """The per-client token the DP hands out in an offer (32 hex digits)."""
    return hmac.new(secret, f"{session_id}:{client_id}".encode(), hashlib.sha256).hexdigest()[:32]


def http_key(session_key: bytes) -> bytes:
    """The key of a sealed session's HTTP bodies, derived from the session key."""
    return hmac.new(session_key, b"mcdeploy unicast v1", hashlib.sha256).digest()


def crypt(key: bytes, session_id: int, offset: int, data: bytes | bytearray | memoryview) -> bytes:
    """XOR ``data`` (image bytes at ``offset``) with the session's ChaCha20 key stream (both directions).

    The stream position is the image offset: 64-byte ChaCha20 blocks, a 32-bit block counter and
    the offset's 256 GiB segment in the nonce, so any range can be (de)crypted on its own.  The same
    image bytes always meet the same stream bytes, which reveals nothing the offsets do not.
    """
    out = bytearray(len(data))
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        at = offset + pos
        n = min(len(data) - pos, PIECE - at % PIECE)
        base = at - at % 64
        nonce = struct.pack("<IQI", (base >> 6) & 0xFFFFFFFF, session_id, at >> 38)
        enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        if at != base:
            enc.update(bytes(at - base))
        out[pos:pos + n] = enc.update(view[pos:pos + n])
        pos += n
    return bytes(out)


def runs(blocks: Iterable[int], block_bytes: int, size: int, max_bytes: int = MAX_RANGE) -> list[tuple[int, int]]:
    """Sorted missing blocks as byte ranges ``(start, end_exclusive)``, each at most ``max_bytes`` long."""
    per = max(1, max_bytes // block_bytes)
    out: list[tuple[int, int]] = []
    first = prev = -2
    for b in sorted(set(blocks)):
        if b == prev + 1 and b - first < per:
            prev = b
            continue
        if first >= 0:
            out.append((first * block_bytes, min(size, (prev + 1) * block_bytes)))
        first = prev = b
    if first >= 0:
        out.append((first * block_bytes, min(size, (prev + 1) * block_bytes)))
    return out


@dataclass
class FetchStats:
    requests: int = 0
    bytes: int = 0  # body bytes fetched
    blocks: int = 0
    seconds: float = 0.0


class Fetcher:
    """One HTTP/1.1 connection to the DP's image URL; :meth:`fetch` streams a byte range block by block."""

    def __init__(self, url: str, session_id: int, client_id: str, token_hex: str, key: bytes | None,
                 timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise UnicastError(f"the DP's unicast URL is not an http URL: {url!r}")
        self.url = url
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path or "/"
        self.session_id = session_id
        self.headers = {TOKEN_HEADER: token_hex, CLIENT_HEADER: client_id, "Connection": "keep-alive"}
        self.key = http_key(key) if key is not None else None
        self.timeout = timeout
        self.stats = FetchStats()
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def fetch(self, start: int, end: int, block_bytes: int, sink: Callable[[int, bytes], None],
              tick: Callable[[], None] | None = None) -> None:
        """GET bytes ``start``..``end``-1 (block aligned), handing each whole block to ``sink(offset, data)``."""
        for attempt in range(2):  # a kept-alive connection the server closed meanwhile: once more, fresh
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request("GET", self.path, headers={**self.headers, "Range": f"bytes={start}-{end - 1}"})
                resp = self._conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt:
                    raise UnicastError(f"cannot fetch from {self.url}: {exc}") from None
                continue
            break
        self.stats.requests += 1
        if resp.status != 206:
            body = resp.read(300).decode("utf-8", "replace").strip()
            self.close()
            raise UnicastError(f"the DP answered {resp.status} {resp.reason} for bytes {start}-{end - 1}"
                               + (f": {body}" if body else ""))
        if (resp.getheader(ENCRYPTED_HEADER) == "chacha20") != (self.key is not None):
            self.close()
            raise UnicastError("the DP's HTTP body is not sealed the way the session is")
        want = f"bytes {start}-{end - 1}/"
        if not (resp.getheader("Content-Range") or "").startswith(want):
            self.close()
            raise UnicastError(f"the DP sent another range than asked ({resp.getheader('Content-Range')})")
        pos, buf = start, bytearray()
        try:
            while pos < end:
                chunk = resp.read(min(READ_BYTES, end - pos - len(buf)))
                if not chunk:
                    raise UnicastError(f"the DP's HTTP response ended at byte {pos + len(buf)} of {end}")
                self.stats.bytes += len(chunk)
                buf += chunk
                while len(buf) >= block_bytes or (buf and pos + len(buf) == end):
                    n = min(block_bytes, len(buf))
                    data = bytes(buf[:n])
                    del buf[:n]
                    if self.key is not None:
                        data = crypt(self.key, self.session_id, pos, data)
                    sink(pos, data)
                    self.stats.blocks += 1
                    pos += n
                if tick is not None:
                    tick()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise UnicastError(f"fetching from {self.url} failed at byte {pos}: {exc}") from None
