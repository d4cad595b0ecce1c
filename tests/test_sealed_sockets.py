"""Sealed (encrypted, authenticated) standalone transfers on real sockets, with a forger on the group.

Loopback multicast, TTL 1, real processes; the forger is a process of this test that listens to the
group and sends back bit-flipped, truncated, re-sealed-under-another-key and random packets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_standalone import Procs, finish, free_port, last_json, mcdeploy, procs  # noqa: F401

pytestmark = pytest.mark.integration

FORGER = r"""
import os, random, socket, struct, sys, time
group, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
from mcproto.seal import PacketSealer
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
rx.bind((group, port))
rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
rx.settimeout(0.2)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
evil = PacketSealer(os.urandom(32), 0)
rng = random.Random(1)
sent = 0
end = time.monotonic() + seconds
while time.monotonic() < end and sent < 200000:
    try:
        pkt, _ = rx.recvfrom(65535)
    except TimeoutError:
        continue
    if len(pkt) < 60:  # (its own truncated forgeries come back too: skip them)
        continue
    session, block, symbol = struct.unpack_from("!QII", pkt, 8)
    b = bytearray(pkt)
    how = sent % 4
    if how == 0:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        forged = bytes(b)
    elif how == 1:
        forged = bytes(b[: rng.randrange(len(b))])
    elif how == 2:
        forged = evil.seal(1, session, block, symbol, os.urandom(len(pkt) - 56))
    else:
        forged = bytes(b[:40]) + os.urandom(len(b) - 40)
    tx.sendto(forged, (group, port))
    sent += 1
    if sent % 100 == 0:
        print(sent, flush=True)
"""


@pytest.mark.timeout(120)
def test_sealed_transfer_is_bit_exact_with_a_forger_on_the_group(procs: Procs, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "image.bin"
    image.write_bytes(os.urandom(8 * 1024 * 1024))
    key = tmp_path / "psk"
    key.write_text(os.urandom(32).hex())
    port = free_port()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0", "--min-receivers",
                                  "2", "--rate", "50", "--key-file", str(key), "--json"))
    forger = procs.start([sys.executable, "-c", FORGER, "239.255.78.1", str(port), "20"])
    time.sleep(1.0)  # let the forger join the group before the transfer can start
    receivers = [procs.start(mcdeploy("receive", "--out", str(tmp_path / f"out{i}"), "--port", str(port), "--id",
                                      f"rx{i}", "--key-file", str(key), "--json", "--wait", "30"))
                 for i in range(2)]
    results = [finish(p, 90) for p in receivers]
    code, _, err = finish(sender, 30)
    forger.terminate()
    forged = finish(forger, 10)[1].split()
    assert forged and int(forged[-1]) >= 100, "the forger did not run"
    for i, (rc, rout, rerr) in enumerate(results):
        assert rc == 0, rerr
        res = last_json(rout)
        assert res["verified"] and res["acknowledged"]
        assert res["rejected"] > 0, res  # forgeries arrived and were refused
        assert (tmp_path / f"out{i}").read_bytes() == image.read_bytes()
    assert code == 0, err


@pytest.mark.timeout(60)
def test_a_receiver_with_the_wrong_key_finds_nothing_and_says_so(procs: Procs, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "image.bin"
    image.write_bytes(os.urandom(1024 * 1024))
    port = free_port()
    procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0", "--key", "11" * 32,
                         "--quiet"))
    t0 = time.monotonic()
    rc, _, err = finish(procs.start(mcdeploy("receive", "--out", str(tmp_path / "o"), "--port", str(port),
                                             "--key", "22" * 32, "--wait", "3")), 30)
    assert rc == 3, err
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "o").exists() or (tmp_path / "o").stat().st_size == 0


def test_key_usage_errors_are_one_line(tmp_path: Path) -> None:
    rc = subprocess.run(mcdeploy("receive", "--out", str(tmp_path / "o"), "--key", "abc"), capture_output=True,
                        text=True, timeout=30)
    assert rc.returncode == 2 and "hex" in rc.stderr and "Traceback" not in rc.stderr
    short = subprocess.run(mcdeploy("send", str(tmp_path), "--key", "00" * 8), capture_output=True, text=True,
                           timeout=30)
    assert short.returncode == 2 and "16 bytes" in short.stderr
