"""Batched UDP: many datagrams per system call where the kernel can, one per call where it cannot.

Portable by construction: the Linux fast paths (UDP GSO, ``UDP_SEGMENT``, on send; UDP GRO,
``UDP_GRO``, on receive; both Linux >= 5.0 for multicast over loopback and veths) are probed at
run time on the socket itself and fall back to one ``sendto``/``recv_into`` per datagram
(Windows/WinPE, macOS, old kernels).  For now the fast paths are opt-in (``MCDEPLOY_UDP_BATCH=1``;
see :func:`batching_allowed`); the tests run both paths.

Why: on one host the cost of moving a datagram is per-frame CPU, not bytes.  One Python
``sendto`` per 1,400-byte datagram is a system call, a trip through the IP stack and a GIL
round trip; GSO hands the kernel up to 64 KiB of equal-sized datagrams in one call, they cross
loopback, veth and bridge as one buffer, and a receiver with GRO gets them back as one buffer
with the segment size in a control message.  The datagrams on the wire are exactly the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
from collections.abc import Iterable

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
MAX_GSO_BYTES = 65000  # one send's payload (below 65,507, the UDP maximum)
MAX_GSO_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS


def batching_allowed() -> bool:
    """Whether fast paths may be tried: Linux, and asked for with ``MCDEPLOY_UDP_BATCH=1``.

    Off by default for now: with them on, a lossy demo (5 clients, 2 % loss, rs16) sent 1.4-1.8x the image
    instead of 1.1x, and one run stalled for 15 s; untraced (see issue 5's notes).  Without loss they gave
    ~20 % more per client (≈60 vs ≈50 MB/s).
    """
    return sys.platform.startswith("linux") and os.environ.get("MCDEPLOY_UDP_BATCH", "0") == "1"


class BatchSender:
    """Sends (datagram, address) lists; consecutive equal-sized datagrams to one address go as one GSO send."""

    def __init__(self, sock: socket.socket, *, batch: bool | None = None) -> None:
        self.sock = sock
        self.gso = batching_allowed() if batch is None else batch
        if self.gso:
            try:
                sock.getsockopt(SOL_UDP, UDP_SEGMENT)
            except OSError:
                self.gso = False
        self.mode = "gso" if self.gso else "sendto"
        self.calls = 0
        self.datagrams = 0
        self.errors = 0

    def send(self, pkts: Iterable[tuple[bytes, object]]) -> None:
        """Send every datagram; a failed system call counts its datagrams in ``errors`` (UDP: best effort)."""
        if not self.gso:
            for pkt, dest in pkts:
                self._one(pkt, dest)
            return
        run: list[bytes] = []
        run_dest: object = None
        run_bytes = 0
        for pkt, dest in pkts:
            size = len(pkt)
            if run and (dest != run_dest or size != len(run[0]) or run_bytes + size > MAX_GSO_BYTES
                        or len(run) >= MAX_GSO_SEGMENTS):
                self._flush(run, run_dest)
                run, run_bytes = [], 0
            run.append(pkt)
            run_dest = dest
            run_bytes += size
        if run:
            self._flush(run, run_dest)

    def _flush(self, run: list[bytes], dest: object) -> None:
        if len(run) == 1:
            self._one(run[0], dest)
            return
        self.calls += 1
        self.datagrams += len(run)
        try:
            self.sock.sendmsg([b"".join(run)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(run[0])))], 0,
                              dest)  # type: ignore[arg-type]
        except OSError as exc:
            if exc.errno in (5, 22, 95, 97):  # EIO/EINVAL/EOPNOTSUPP: this route cannot segment; stop trying
                self.gso, self.mode = False, "sendto"
                self.calls -= 1
                self.datagrams -= len(run)
                for pkt in run:
                    self._one(pkt, dest)
                return
            self.errors += len(run)

    def _one(self, pkt: bytes, dest: object) -> None:
        self.calls += 1
        self.datagrams += 1
        try:
            self.sock.sendto(pkt, dest)  # type: ignore[arg-type]
        except OSError:
            self.errors += 1


class BatchReceiver:
    """Reads every datagram waiting on a non-blocking socket, GRO-coalesced ones split back apart.

    :meth:`receive` returns memoryviews into buffers owned by this object: valid until the next
    call (the caller copies what it keeps; the receiver copies symbols anyway).
    """

    def __init__(self, sock: socket.socket, max_datagram: int, *, batch: bool | None = None,
                 max_per_call: int = 512) -> None:
        self.sock = sock
        self.max_datagram = max_datagram
        self.max_per_call = max_per_call
        self.gro = batching_allowed() if batch is None else batch
        if self.gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            except OSError:
                self.gro = False
        self.mode = "gro" if self.gro else "recv"
        self.calls = 0
        self.datagrams = 0
        # Without GRO: one buffer per datagram, recycled each call (GRO: a fresh 64 KiB buffer per call).
        self._bufs = [bytearray(max_datagram) for _ in range(max_per_call if not self.gro else 0)]
        self._cmsg = socket.CMSG_SPACE(4) if self.gro else 0

    def receive(self) -> list[memoryview]:
        """Every datagram that is waiting now (at most ``max_per_call`` system calls' worth)."""
        return self._receive_gro() if self.gro else self._receive_plain()

    def _receive_plain(self) -> list[memoryview]:
        out: list[memoryview] = []
        for buf in self._bufs:
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP errors surfacing on Windows; nothing to read now
                break
            self.calls += 1
            out.append(memoryview(buf)[:n])
        self.datagrams += len(out)
        return out

    def _receive_gro(self) -> list[memoryview]:
        out: list[memoryview] = []
        for _ in range(max(1, self.max_per_call // MAX_GSO_SEGMENTS)):
            big = bytearray(65536)  # a fresh buffer per call: views handed out earlier stay valid this turn
            try:
                n, anc, _flags, _addr = self.sock.recvmsg_into([big], self._cmsg)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self.calls += 1
            seg = n
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
                    with contextlib.suppress(struct.error):
                        seg = struct.unpack("=H", data[:2])[0] if len(data) < 4 else struct.unpack("=i", data[:4])[0]
            view = memoryview(big)[:n]
            if seg <= 0 or seg >= n:
                out.append(view)
            else:
                out.extend(view[i:i + seg] for i in range(0, n, seg))
        self.datagrams += len(out)
        return out
