"""``mcdeploy send`` / ``mcdeploy receive`` across real links: network namespaces, tc loss and rate caps.

Every packet stays inside namespaces this file creates (:mod:`tests.netns`); the host's
interfaces are never used.  IPv6 multicast does not work on ``lo`` here, so this is where the
IPv6 session and data planes are proven.  Ports are the commands' defaults: each topology is
a private network, so parallel runs cannot meet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Topology, netns_available, tc_available

_ok, _why = netns_available()
_tc_ok, _tc_why = tc_available()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not _ok, reason=_why or "network namespaces unavailable"),
    pytest.mark.skipif(not _tc_ok, reason=_tc_why or "tc unavailable"),
]

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
GROUP4 = "239.255.78.9"
GROUP6 = "ff15::78:1"


def _mcdeploy(topo: Topology, ns: str, *args: str) -> subprocess.Popen[str]:
    return topo.popen(ns, sys.executable, "-m", "controller", *args, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen[str], timeout: float) -> tuple[int, dict[str, Any] | None, str]:
    out, err = p.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    return p.returncode, json.loads(lines[-1]) if lines else None, err


def _image(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "image.bin"
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_three_receivers_on_lossy_links_get_bit_exact_copies(tmp_path: Path, v6: bool) -> None:
    image = _image(tmp_path, 8 * 1024 * 1024 + 4321)
    with Topology(receivers=3, ipv6=v6) as topo:
        lossy, slightly = topo.receivers[0], topo.receivers[1]
        topo.set_loss(lossy, 5)
        topo.set_loss(slightly, 1)
        s = topo.sender
        if v6:
            # Interface by name for the sender and one receiver, by address for another (found in the
            # kernel's address table), and from the path towards --from for the last.
            group, control, send_if = GROUP6, topo.sender_ip6, topo.ifname(s)
            recv_if = [topo.ifname(lossy), topo.ip6(slightly), None]
            from_addr = f"[{control}]:47300"
        else:
            group, control, send_if = GROUP4, topo.sender_ip, topo.sender_ip
            recv_if = [topo.ip(lossy), topo.ip(slightly), None]
            from_addr = f"{control}:47300"
        t0 = time.monotonic()
        sender = _mcdeploy(topo, s, "send", str(image), "--group", group, "--interface", send_if,
                           "--control-host", control, "--min-receivers", "3", "--rate", "400", "--json")
        receivers = []
        for i, ns in enumerate(topo.receivers):
            # Two find the sender by its announce on the group; the third is told its address.
            where = ["--interface", recv_if[i]] if recv_if[i] else ["--from", from_addr]
            receivers.append(_mcdeploy(topo, ns, "receive", "--out", str(tmp_path / f"out{i}"), "--group", group,
                                       *where, "--id", f"pc{i}", "--wait", "20", "--json"))
        results = [_finish(p, 45) for p in receivers]
        code, summary, err = _finish(sender, 20)
        elapsed = time.monotonic() - t0
        drops = topo.ingress_stats(lossy)
    for rc, res, rerr in results:
        assert rc == 0, rerr
        assert res and res["verified"] and res["acknowledged"], res
    original = image.read_bytes()
    for i in range(3):
        assert (tmp_path / f"out{i}").read_bytes() == original, f"receiver {i} differs"
    assert code == 0, err
    assert summary and summary["done"] == summary["receivers"] == 3, summary
    assert drops["drops"] > 0, drops  # tc really dropped packets on the lossy link
    print(f"netns {'IPv6' if v6 else 'IPv4'}: {summary['mb_per_s']} MB/s, {summary['seconds']} s transfer, "
          f"{summary['repair_symbols']} repair symbols; tc dropped {drops['drops']}/{drops['packets']} on the "
          f"5 % link; whole test {elapsed:.1f} s")


@pytest.mark.timeout(60)
def test_rate_below_a_capped_link_completes_in_about_size_over_rate(tmp_path: Path) -> None:
    size, rate_mbit, cap_mbit = 8 * 1024 * 1024, 40.0, 50.0
    image = _image(tmp_path, size)
    with Topology(receivers=2, ipv6=False) as topo:
        topo.set_rate(topo.sender, cap_mbit)
        sender = _mcdeploy(topo, topo.sender, "send", str(image), "--group", GROUP4, "--interface", topo.sender_ip,
                           "--min-receivers", "2", "--rate", str(rate_mbit), "--json")
        receivers = [_mcdeploy(topo, ns, "receive", "--out", str(tmp_path / f"out{i}"), "--group", GROUP4,
                               "--interface", topo.ip(ns), "--id", f"pc{i}", "--wait", "20", "--json")
                     for i, ns in enumerate(topo.receivers)]
        results = [_finish(p, 45) for p in receivers]
        code, summary, err = _finish(sender, 20)
    for rc, _, rerr in results:
        assert rc == 0, rerr
    assert code == 0, err
    assert summary is not None
    for i in range(2):
        assert (tmp_path / f"out{i}").read_bytes() == image.read_bytes()
    ideal = size * 8 / (rate_mbit * 1e6)  # seconds at exactly --rate, without any overhead
    print(f"netns rate: {summary['seconds']} s for {size} bytes at --rate {rate_mbit:g} over a {cap_mbit:g} Mbit/s "
          f"link (ideal {ideal:.2f} s), {summary['wire_mb_per_s'] * 8:.1f} Mbit/s on the wire")
    # Never faster than --rate allows; not much slower than the rate plus FEC and header overhead.
    assert 0.95 * ideal <= summary["seconds"] <= 2.5 * ideal, summary
    assert summary["wire_mb_per_s"] * 8 <= rate_mbit * 1.05, summary
