"""The namespace test network of tests/netns.py: multicast over it (IPv4, IPv6), loss, rate cap, cleanup.

Everything runs inside namespaces the tests create (see tests/netns.py); the host's interfaces,
routes and firewall are never touched. Skipped where namespaces cannot be created (not root, no ip).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.netns import Topology, list_netns, netns_available, remove_leftovers, tc_available

_ok, _why = netns_available()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(not _ok, reason=_why or "network namespaces unavailable")]
needs_tc = pytest.mark.skipif(not tc_available()[0], reason=tc_available()[1] or "tc unavailable")

GROUP4 = "239.255.77.9"
GROUP6 = "ff15::77:9"

RECEIVER = r"""
import json, socket, struct, sys, time
cfg = json.loads(sys.argv[1])
fam = socket.AF_INET6 if cfg["v6"] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
if cfg["v6"]:
    s.bind((cfg["group"], cfg["port"], 0, 0))
    mreq = socket.inet_pton(fam, cfg["group"]) + struct.pack("@I", cfg["ifindex"])
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
else:
    s.bind((cfg["group"], cfg["port"]))
    mreq = socket.inet_aton(cfg["group"]) + socket.inet_aton(cfg["ifaddr"])
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
print("ready", flush=True)
seen, sources, nbytes, first, last, ends = set(), {}, 0, None, None, 0
hard = time.monotonic() + cfg["deadline"]
while (left := hard - time.monotonic()) > 0:
    s.settimeout(min(left, 0.3 if ends else cfg["idle"]))
    try:
        data, addr = s.recvfrom(65535)
    except TimeoutError:
        if ends or seen:
            break
        continue
    if data[:3] == b"END":
        ends += 1
        continue
    last = time.monotonic()
    first = first or last
    seen.add(struct.unpack_from("!I", data)[0])
    nbytes += len(data)
    sources[addr[0]] = sources.get(addr[0], 0) + 1
print(json.dumps({"unique": len(seen), "total": sum(sources.values()), "sources": sources, "bytes": nbytes,
                  "span": (last - first) if seen else 0.0, "ends": ends}))
"""

SENDER = r"""
import json, socket, struct, sys, time
cfg = json.loads(sys.argv[1])
fam = socket.AF_INET6 if cfg["v6"] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
if cfg["v6"]:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, struct.pack("@I", cfg["ifindex"]))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
    dest = (cfg["group"], cfg["port"], 0, 0)
else:
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(cfg["ifaddr"]))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    if cfg.get("df"):
        s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO (Linux; no constants in 3.11)
    dest = (cfg["group"], cfg["port"])
pad = b"x" * (cfg["size"] - 4)
start = time.monotonic()
for seq in range(cfg["count"]):
    s.sendto(struct.pack("!I", seq) + pad, dest)
    if cfg["burst"] and seq % cfg["burst"] == cfg["burst"] - 1:
        time.sleep(cfg["pause"])
elapsed = time.monotonic() - start
time.sleep(0.05)
for _ in range(10):
    s.sendto(b"END", dest)
    time.sleep(0.02)
print(json.dumps({"sent": cfg["count"], "elapsed": elapsed}))
"""


def _cfg(topo: Topology, ns: str, v6: bool, port: int, **extra: Any) -> str:
    cfg = {"v6": v6, "group": GROUP6 if v6 else GROUP4, "port": port, "ifaddr": topo.ip(ns),
           "ifindex": topo.ifindex(ns), "deadline": 20.0, "idle": 2.0, **extra}
    return json.dumps(cfg)


def _start_receivers(topo: Topology, v6: bool, port: int, namespaces: list[str] | None = None,
                     ) -> list[subprocess.Popen[str]]:
    procs = [topo.popen(ns, sys.executable, "-c", RECEIVER, _cfg(topo, ns, v6, port), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) for ns in namespaces or topo.receivers]
    deadline = time.monotonic() + 15
    for p in procs:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = p.stdout.readline() if ready else ""
        assert line.strip() == "ready", f"receiver did not start: {line!r} {p.poll()=}"
    return procs


def _send(topo: Topology, v6: bool, port: int, count: int, size: int = 256, burst: int = 50,
          pause: float = 0.002, **extra: Any) -> dict[str, Any]:
    res = topo.run(topo.sender, sys.executable, "-c", SENDER,
                   _cfg(topo, topo.sender, v6, port, count=count, size=size, burst=burst, pause=pause, **extra),
                   capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _collect(procs: list[subprocess.Popen[str]], timeout: float = 25) -> list[dict[str, Any]]:
    results = []
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(0.1, deadline - time.monotonic()))
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=10, check=True)
    return [link["ifname"] for link in json.loads(out.stdout)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_multicast_reaches_every_receiver(v6: bool) -> None:
    count = 2000
    with Topology(receivers=3) as topo:
        assert not [name for name in _root_links() if topo.tag in name], "topology leaked into the root namespace"
        procs = _start_receivers(topo, v6, 47709)
        sent = _send(topo, v6, 47709, count)
        results = _collect(procs)
    assert sent["sent"] == count
    source = topo.sender_ip6 if v6 else topo.sender_ip
    for ns, r in zip(topo.receivers, results, strict=True):
        assert r["unique"] >= 0.995 * count, (ns, r)
        assert r["total"] == r["unique"], (ns, r)  # no duplicates
        assert set(r["sources"]) == {source}, (ns, r)


@needs_tc
@pytest.mark.timeout(30)
def test_random_loss_on_one_receiver() -> None:
    count = 5000
    with Topology(receivers=3, ipv6=False) as topo:
        lossy = topo.receivers[0]
        effective = topo.set_loss(lossy, 10)
        assert abs(effective - 10) < 0.01
        procs = _start_receivers(topo, False, 47710)
        _send(topo, False, 47710, count)
        results = _collect(procs)
        stats = topo.ingress_stats(lossy)
        backend = topo.loss_backend(lossy)
        topo.clear_loss(lossy)
        assert topo.ingress_stats(lossy) == {"packets": 0, "drops": 0}
    print(f"loss backend {backend}; lossy receiver {results[0]}; tc ingress {stats}")
    assert 0.85 * count <= results[0]["unique"] <= 0.95 * count, results[0]
    assert 0.05 <= stats["drops"] / stats["packets"] <= 0.15, stats
    for r in results[1:]:
        assert r["unique"] >= 0.995 * count, r


@needs_tc
@pytest.mark.timeout(40)
def test_rate_cap_on_sender() -> None:
    size, count = 1200, 2100  # ~2.5 MB: ~1 s at 20 Mbit/s
    with Topology(receivers=1, ipv6=False) as topo:
        topo.set_rate(topo.sender, 20)
        procs = _start_receivers(topo, False, 47711)
        sent = _send(topo, False, 47711, count, size=size, burst=0)
        (capped,) = _collect(procs)
        topo.clear_rate(topo.sender)
        procs = _start_receivers(topo, False, 47712)
        free = _send(topo, False, 47712, count, size=size, burst=0)
        _collect(procs)
    rx_mbit = (capped["unique"] - 1) * size * 8 / capped["span"] / 1e6
    tx_mbit = count * size * 8 / sent["elapsed"] / 1e6
    free_mbit = count * size * 8 / free["elapsed"] / 1e6
    print(f"capped: received {rx_mbit:.1f} Mbit/s, sender {tx_mbit:.1f} Mbit/s; uncapped sender {free_mbit:.0f} Mbit/s")
    assert capped["unique"] >= 0.995 * count, capped  # htb holds the sender back instead of dropping
    assert 12 <= rx_mbit <= 24, rx_mbit
    assert tx_mbit <= 24, tx_mbit
    assert free_mbit > 40, free_mbit  # the cap, not the machine, was the limit


@pytest.mark.timeout(30)
def test_jumbo_mtu_without_fragmentation() -> None:
    with Topology(receivers=1, ipv6=False, mtu=9000) as topo:
        for ns in (topo.sender, topo.receivers[0]):
            out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", topo.ifname(ns)],
                                 capture_output=True, text=True, check=True, timeout=10).stdout
            assert json.loads(out)[0]["mtu"] == 9000
        procs = _start_receivers(topo, False, 47713)
        _send(topo, False, 47713, 50, size=8900, df=True)  # DF set: only fits a 9000-byte MTU unfragmented
        (r,) = _collect(procs)
    assert r["unique"] == 50 and r["bytes"] == 50 * 8900, r


def _alive(p: subprocess.Popen[Any]) -> bool:
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return True
    return False


@pytest.mark.timeout(30)
def test_cleanup_on_exit_and_on_exception() -> None:
    with Topology(receivers=2) as topo:
        tracked = topo.popen(topo.receivers[0], "sleep", "300")
        # Started in the namespace without the helper: close() must still find and end it by PID.
        stray = subprocess.Popen(topo.command(topo.receivers[1], "sleep", "300"))
        try:
            names = topo.namespaces
            assert set(names) <= set(list_netns())
        except BaseException:
            stray.kill()
            raise
    assert not set(names) & set(list_netns())
    assert not [name for name in _root_links() if topo.tag in name]
    assert not _alive(tracked) and not _alive(stray)
    topo.close()  # idempotent

    with pytest.raises(RuntimeError, match="body failed"), Topology(receivers=1) as topo2:
        proc = topo2.popen(topo2.sender, "sleep", "300")
        raise RuntimeError("body failed")
    assert not set(topo2.namespaces) & set(list_netns())
    assert not _alive(proc)


@pytest.mark.timeout(30)
def test_remove_leftovers_touches_only_its_own_topology() -> None:
    a = Topology(receivers=1)
    b = Topology(receivers=1)
    try:
        removed = remove_leftovers(a.tag)
        assert sorted(removed) == sorted(a.namespaces)
        present = set(list_netns())
        assert not set(a.namespaces) & present
        assert set(b.namespaces) <= present
        a.close()  # nothing left to do, and no error
    finally:
        a.close()
        b.close()
    assert not set(b.namespaces) & set(list_netns())
