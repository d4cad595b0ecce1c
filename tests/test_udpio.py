"""Batched UDP on real loopback multicast: GSO/GRO where the kernel has them, the portable path always.

Every combination of sender (GSO or one sendto per datagram) and receiver (GRO or one recv per
datagram) must deliver the same datagrams, byte for byte and in order; the portable path is what
Windows/WinPE clients run, so it is tested here even on Linux.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import time

import pytest

from clientagent.net import open_data_socket
from clientagent.udpio import BatchReceiver, BatchSender
from tests.test_standalone import free_port

GROUP = "239.255.78.91"


def _tx() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return s


@pytest.mark.parametrize("send_batch", [True, False], ids=["gso", "sendto"])
@pytest.mark.parametrize("recv_batch", [True, False], ids=["gro", "recv"])
def test_batched_and_portable_paths_deliver_the_same_datagrams(send_batch: bool, recv_batch: bool) -> None:
    if (send_batch or recv_batch) and not sys.platform.startswith("linux"):
        pytest.skip("UDP GSO/GRO are Linux features")
    port = free_port()
    rx = open_data_socket(GROUP, port, "127.0.0.1")
    tx = _tx()
    try:
        receiver = BatchReceiver(rx, 2048, batch=recv_batch)
        sender = BatchSender(tx, batch=send_batch)
        assert receiver.mode == ("gro" if recv_batch else "recv")
        assert sender.mode == ("gso" if send_batch else "sendto")
        dest = (GROUP, port)
        # Runs of equal-sized datagrams broken by odd ones (heartbeats), as a session sends them.
        sent = [os.urandom(1448) for _ in range(100)] + [os.urandom(30)] + [os.urandom(1448) for _ in range(50)]
        sent += [os.urandom(700)]
        for i in range(0, len(sent), 64):
            sender.send([(p, dest) for p in sent[i:i + 64]])
        assert sender.errors == 0 and sender.datagrams == len(sent)
        if send_batch:
            assert sender.calls < len(sent) // 10  # really batched: ~44 datagrams per system call
        got: list[bytes] = []
        sel = selectors.DefaultSelector()
        sel.register(rx, selectors.EVENT_READ)
        deadline = time.monotonic() + 5
        while len(got) < len(sent) and time.monotonic() < deadline:
            if sel.select(0.2):
                got += [bytes(v) for v in receiver.receive()]
        sel.close()
        assert got == sent
        if send_batch and recv_batch:
            assert receiver.calls < len(sent) // 10  # coalesced on the way in too
    finally:
        rx.close()
        tx.close()


def test_the_environment_switch_chooses_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCDEPLOY_UDP_BATCH", "0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert BatchSender(s).mode == "sendto"
        assert BatchReceiver(s, 1500).mode == "recv"
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("MCDEPLOY_UDP_BATCH", "1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            assert BatchSender(s).mode == "gso"
            assert BatchReceiver(s, 1500).mode == "gro"
