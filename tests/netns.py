"""A throw-away multicast test network in Linux network namespaces (IPv4 and IPv6).

    with Topology(receivers=3) as topo:
        topo.set_loss(topo.receivers[0], 10)          # random ingress loss on that receiver
        topo.set_rate(topo.sender, 20)                # egress cap (htb) on the sender, Mbit/s
        p = topo.popen(topo.receivers[0], sys.executable, "-m", "clientagent", ...)
        topo.run(topo.sender, sys.executable, "-c", "...", timeout=30)

Layout, all of it inside namespaces this module creates (nothing is added to the host's
root namespace, no host interface, route or firewall is touched)::

    mcd-TAG-s  (sender)    10.77.0.1/24   fd00:77::1/64     --veth--+
    mcd-TAG-r0 (receiver)  10.77.0.10/24  fd00:77::10/64    --veth--+-- bridge brTAG in mcd-TAG-sw
    mcd-TAG-rN (receiver)  10.77.0.(10+N) fd00:77::(10+N)   --veth--+   (multicast snooping off)

TAG is random per topology, so parallel runs never collide; every namespace, interface and
bridge name carries it. ``close()`` (also run by the context manager and at interpreter exit)
stops the processes started through ``popen``/``run`` by PID, then any other process still
inside this topology's namespaces (only something started in them can be there), then deletes
the namespaces, which takes their veths and the bridge with them. ``remove_leftovers(tag)``
does the same for a topology whose owner died.

Loss is injected on the ingress of a namespace's veth, inside that namespace, with tc. The
kernels here have neither ``sch_netem`` nor ``act_gact``/``cls_matchall`` (nor nft/iptables in
user space), so the first choice is a classic-BPF ``cls_bpf`` filter in direct-action mode that
drops when the kernel's per-packet random number (``ld rand``) is below ``p * 2**32``; where
cls_bpf is missing, ``matchall`` + ``gact ... random netrand drop N`` is used (gact drops one
packet in N on average: ``if (prandom % N) pass; else drop``, so only 1/N probabilities).
Rate limits are an htb root qdisc on the namespace's veth (egress).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from typing import Any

# The low-level helpers (commands with timeouts, namespace listing, ending our own PIDs) are the
# benchmark's: one implementation for the tests' and bench/transport.py's topologies.
from bench.topology import TopologyError, _ip, _netns_pids, _tc, list_netns
from bench.topology import cmd as _cmd
from bench.topology import stop_pids as _stop_pids

PREFIX = "mcd"
SUBNET4 = "10.77.0"
SUBNET6 = "fd00:77:"
MAX_RECEIVERS = 200

# Classic BPF: A = random u32 (ancillary load SKF_AD_OFF + SKF_AD_RANDOM); A >= T ? TC_ACT_OK : TC_ACT_SHOT
_SKF_AD_RANDOM = 0xFFFFF000 + 56
_TC_ACT_OK = 0
_TC_ACT_SHOT = 2


def _sysctl(ns: str, values: dict[str, int]) -> None:
    """Set sysctls inside ``ns`` only (``ip netns exec`` runs sysctl in that namespace)."""
    pairs = [f"{k}={v}" for k, v in values.items()]
    if shutil.which("sysctl"):
        _cmd(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *pairs])
    else:  # /proc/sys/net shows the namespace of the process that reads it
        code = ("import sys\nfor kv in sys.argv[1:]:\n    k, v = kv.split('=')\n"
                "    open('/proc/sys/' + k.replace('.', '/'), 'w').write(v)")
        _cmd(["ip", "netns", "exec", ns, sys.executable, "-c", code, *pairs])


def _names_for(tag: str) -> str:
    return f"{PREFIX}-{tag}-"


def remove_leftovers(tag: str) -> list[str]:
    """Remove what is left of the topology with this ``tag`` (and nothing else); returns the namespaces removed.

    Processes still inside those namespaces are ended by PID first, so the namespaces (and with them
    the veths and the bridge) really go away.
    """
    if not tag or not tag.isalnum():
        raise ValueError(f"bad topology tag {tag!r}")
    prefix = _names_for(tag)
    mine = [ns for ns in list_netns() if ns.startswith(prefix)]
    pids = [pid for ns in mine for pid in _netns_pids(ns) if pid != os.getpid()]
    _stop_pids(pids)
    # Endpoints first, the switch (which holds the bridge) last.
    for ns in sorted(mine, key=lambda n: n.endswith("-sw")):
        _ip(None, "netns", "delete", ns, check=False)
    return mine


@functools.cache
def netns_available() -> tuple[bool, str]:
    """Whether network namespaces (with veth and bridge) can be created here, and why not."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 'ip' not found"
    probe = f"{PREFIX}-probe{secrets.token_hex(3)}"
    try:
        res = _ip(None, "netns", "add", probe, check=False)
        if res.returncode != 0:
            return False, f"'ip netns add' failed: {res.stderr.strip()}"
        for args in (("link", "add", "name", "pa", "type", "veth", "peer", "name", "pb"),
                     ("link", "add", "name", "pbr", "type", "bridge")):
            res = _ip(probe, *args, check=False)
            if res.returncode != 0:
                return False, f"'ip link add ... type {args[-1]}' failed in a namespace: {res.stderr.strip()}"
        return True, ""
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"namespace probe failed: {exc}"
    finally:
        _ip(None, "netns", "delete", probe, check=False)


def tc_available() -> tuple[bool, str]:
    if shutil.which("tc") is None:
        return False, "iproute2 'tc' not found"
    return True, ""


class Topology:
    """One sender and ``receivers`` receiver namespaces on a private bridge (see the module doc)."""

    def __init__(self, receivers: int, ipv6: bool = True, mtu: int = 1500, *, tag: str | None = None) -> None:
        if not 1 <= receivers <= MAX_RECEIVERS:
            raise ValueError(f"receivers must be 1..{MAX_RECEIVERS}")
        if not 68 <= mtu <= 65535 or (ipv6 and mtu < 1280):
            raise ValueError(f"bad mtu {mtu}")
        self.tag = tag or secrets.token_hex(3)
        if not self.tag.isalnum() or len(self.tag) > 6:
            raise ValueError("tag must be at most 6 alphanumeric characters")
        self.ipv6 = ipv6
        self.mtu = mtu
        base = _names_for(self.tag)
        self.switch = base + "sw"
        self.bridge = f"br{self.tag}"
        self.sender = base + "s"
        self.receivers = [f"{base}r{i}" for i in range(receivers)]
        self.sender_ip = f"{SUBNET4}.1"
        self.receiver_ips = [f"{SUBNET4}.{10 + i}" for i in range(receivers)]
        self.sender_ip6 = f"{SUBNET6}:1" if ipv6 else ""
        self.receiver_ips6 = [f"{SUBNET6}:{10 + i}" for i in range(receivers)] if ipv6 else []
        self._ifnames = {self.sender: f"m{self.tag}s"}
        self._ports = {self.sender: f"p{self.tag}s"}
        for i, ns in enumerate(self.receivers):
            self._ifnames[ns] = f"m{self.tag}r{i}"
            self._ports[ns] = f"p{self.tag}r{i}"
        self._ifindex: dict[str, int] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._loss: dict[str, tuple[str, float]] = {}
        self._closed = False
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction -----------------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this topology, the switch last."""
        return [self.sender, *self.receivers, self.switch]

    def _build(self) -> None:
        for ns in self.namespaces:
            _ip(None, "netns", "add", ns)
        # The switch namespace only bridges frames: no IPv6 on its links (no RS/MLD/DAD chatter).
        _sysctl(self.switch, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        _ip(self.switch, "link", "add", "name", self.bridge, "mtu", str(self.mtu), "type", "bridge",
            "mcast_snooping", "0", "stp_state", "0", "forward_delay", "0")
        _ip(self.switch, "link", "set", "dev", self.bridge, "up")
        endpoints = [(self.sender, self.sender_ip, self.sender_ip6)]
        endpoints += list(zip(self.receivers, self.receiver_ips, self.receiver_ips6 or [""] * len(self.receivers),
                              strict=True))
        for ns, ip4, ip6 in endpoints:
            self._build_endpoint(ns, ip4, ip6)
        self._wait_ready()

    def _build_endpoint(self, ns: str, ip4: str, ip6: str) -> None:
        ifname, port = self._ifnames[ns], self._ports[ns]
        if self.ipv6:
            # Before the veth exists, so it (and its link-local address) inherit "no DAD".
            _sysctl(ns, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0})
        else:
            _sysctl(ns, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        # Both ends are created directly in their namespaces: nothing ever appears in the root namespace.
        _ip(ns, "link", "add", "name", ifname, "mtu", str(self.mtu), "type", "veth",
            "peer", "name", port, "mtu", str(self.mtu), "netns", self.switch)
        _ip(self.switch, "link", "set", "dev", port, "master", self.bridge)
        _ip(self.switch, "link", "set", "dev", port, "up")
        _ip(ns, "link", "set", "dev", "lo", "up")
        _ip(ns, "addr", "add", f"{ip4}/24", "dev", ifname)
        if ip6:
            _ip(ns, "-6", "addr", "add", f"{ip6}/64", "dev", ifname, "nodad")
        _ip(ns, "link", "set", "dev", ifname, "up")
        # No default route in a namespace: send multicast out of the veth even without IP_MULTICAST_IF.
        # IPv6 needs nothing: the kernel adds "multicast ff00::/8 dev IF table local" itself.
        _ip(ns, "route", "add", "224.0.0.0/4", "dev", ifname)

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        pending = [ns for ns in self.namespaces if ns != self.switch]
        while pending:
            pending = [ns for ns in pending if not self._endpoint_ready(ns)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TopologyError(f"interfaces not ready after {timeout}s in {pending}")
            time.sleep(0.02)

    def _endpoint_ready(self, ns: str) -> bool:
        info = json.loads(_ip(ns, "-j", "addr", "show", "dev", self._ifnames[ns]).stdout)[0]
        if info.get("operstate") != "UP":
            return False
        addrs = info.get("addr_info", [])
        if any(a.get("tentative") for a in addrs):
            return False
        return not self.ipv6 or any(a.get("family") == "inet6" and a.get("scope") == "link" for a in addrs)

    # -- queries ----------------------------------------------------------------------------------

    def _check_ns(self, ns: str) -> None:
        if ns not in self._ifnames:
            raise KeyError(f"{ns!r} is not an endpoint of topology {self.tag}")

    def ifname(self, ns: str) -> str:
        """The veth's name inside endpoint namespace ``ns``."""
        self._check_ns(ns)
        return self._ifnames[ns]

    def port(self, ns: str) -> str:
        """The bridge port (in the switch namespace) that leads to ``ns``."""
        self._check_ns(ns)
        return self._ports[ns]

    def ifindex(self, ns: str) -> int:
        """The veth's interface index inside ``ns`` (for IPV6_JOIN_GROUP / IPV6_MULTICAST_IF)."""
        self._check_ns(ns)
        if ns not in self._ifindex:
            info = json.loads(_ip(ns, "-j", "link", "show", "dev", self._ifnames[ns]).stdout)[0]
            self._ifindex[ns] = int(info["ifindex"])
        return self._ifindex[ns]

    def ip(self, ns: str) -> str:
        self._check_ns(ns)
        return self.sender_ip if ns == self.sender else self.receiver_ips[self.receivers.index(ns)]

    def ip6(self, ns: str) -> str:
        self._check_ns(ns)
        if not self.ipv6:
            raise ValueError("topology built without IPv6")
        return self.sender_ip6 if ns == self.sender else self.receiver_ips6[self.receivers.index(ns)]

    # -- processes --------------------------------------------------------------------------------

    def command(self, ns: str, *argv: str) -> list[str]:
        """The argv that runs ``argv`` inside ``ns`` (``ip netns exec`` execs it: same PID)."""
        if ns not in self.namespaces:
            raise KeyError(f"{ns!r} is not a namespace of topology {self.tag}")
        if not argv:
            raise ValueError("empty command")
        return ["ip", "netns", "exec", ns, *map(str, argv)]

    def popen(self, ns: str, *argv: str, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns``; ``close()`` ends it by PID if it still runs."""
        self._check_open()
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.command(ns, *argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    def run(self, ns: str, *argv: str, timeout: float = 60.0, check: bool = False,
            **popen_kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in ``ns`` to completion, like ``subprocess.run`` (``capture_output``, ``input``).

        Bounded by ``timeout``: on expiry the process is ended and ``TimeoutExpired`` raised.
        """
        if popen_kwargs.pop("capture_output", False):
            popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
        stdin_data = popen_kwargs.pop("input", None)
        if stdin_data is not None:
            popen_kwargs["stdin"] = subprocess.PIPE
        proc = self.popen(ns, *argv, **popen_kwargs)
        try:
            out, err = proc.communicate(stdin_data, timeout=timeout)
        except BaseException:
            self._end(proc)
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._procs.remove(proc)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    @staticmethod
    def _end(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TopologyError(f"topology {self.tag} is closed")

    # -- impairments ------------------------------------------------------------------------------

    def set_loss(self, ns: str, percent: float) -> float:
        """Drop ``percent`` % of the packets arriving on ``ns``'s veth, at random; returns the effective percent.

        Replaces an earlier loss setting. Everything arriving is subject to it (ARP/ND too), as on a bad link.
        """
        self._check_open()
        if not 0 <= percent <= 100:
            raise ValueError("percent must be within 0..100")
        self.clear_loss(ns)
        if percent == 0:
            return 0.0
        dev = self.ifname(ns)
        _tc(ns, "qdisc", "add", "dev", dev, "ingress")
        errors = []
        for backend in (self._loss_bpf, self._loss_gact):
            try:
                effective = backend(ns, dev, percent)
            except TopologyError as exc:
                errors.append(str(exc))
                continue
            self._loss[ns] = (backend.__name__.removeprefix("_loss_"), effective)
            return effective
        self.clear_loss(ns)
        raise TopologyError("no way to inject loss with tc here: " + " | ".join(errors))

    @staticmethod
    def _loss_bpf(ns: str, dev: str, percent: float) -> float:
        if percent >= 100:
            code = f"1,6 0 0 {_TC_ACT_SHOT}"
            effective = 100.0
        else:
            threshold = min(round(percent / 100 * 2**32), 2**32 - 1)
            code = f"4,32 0 0 {_SKF_AD_RANDOM},53 0 1 {threshold},6 0 0 {_TC_ACT_OK},6 0 0 {_TC_ACT_SHOT}"
            effective = threshold / 2**32 * 100
        _tc(ns, "filter", "add", "dev", dev, "ingress", "prio", "1", "protocol", "all", "bpf", "da",
            "bytecode", code)
        return effective

    @staticmethod
    def _loss_gact(ns: str, dev: str, percent: float) -> float:
        # gact drops when prandom % N == 0: one packet in N, so only 100/N percent can be had.
        one_in = max(1, min(10000, round(100 / percent)))
        action = ["action", "gact", "pass", "random", "netrand", "drop", str(one_in)]
        try:
            _tc(ns, "filter", "add", "dev", dev, "ingress", "prio", "1", "protocol", "all", "matchall", *action)
        except TopologyError:  # no cls_matchall: u32 matching everything does the same
            _tc(ns, "filter", "add", "dev", dev, "ingress", "prio", "1", "protocol", "all", "u32",
                "match", "u32", "0", "0", *action)
        return 100 / one_in

    def loss_backend(self, ns: str) -> tuple[str, float] | None:
        """``(backend, effective percent)`` of the loss set on ``ns``, or None."""
        return self._loss.get(ns)

    def clear_loss(self, ns: str) -> None:
        dev = self.ifname(ns)
        _tc(ns, "qdisc", "del", "dev", dev, "ingress", check=False)
        self._loss.pop(ns, None)

    def ingress_stats(self, ns: str) -> dict[str, int]:
        """Packets seen and dropped by the loss filter on ``ns`` since ``set_loss`` (zeros without loss)."""
        out = _tc(ns, "-s", "-j", "qdisc", "show", "dev", self.ifname(ns), "ingress").stdout
        for q in json.loads(out or "[]"):
            if q.get("kind") == "ingress":
                return {"packets": int(q.get("packets", 0)), "drops": int(q.get("drops", 0))}
        return {"packets": 0, "drops": 0}

    def set_rate(self, ns: str, mbit: float, *, burst_bytes: int | None = None) -> None:
        """Cap what leaves ``ns`` through its veth at ``mbit`` Mbit/s (htb, counted on whole frames)."""
        self._check_open()
        if mbit <= 0:
            raise ValueError("mbit must be positive")
        dev = self.ifname(ns)
        rate = f"{max(1, round(mbit * 1000))}kbit"
        quantum = str(max(1600, self.mtu + 100))
        self.clear_rate(ns)
        _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        burst = ["burst", str(burst_bytes), "cburst", str(burst_bytes)] if burst_bytes else []
        _tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate, "ceil", rate,
            "quantum", quantum, *burst)

    def clear_rate(self, ns: str) -> None:
        _tc(ns, "qdisc", "del", "dev", self.ifname(ns), "root", check=False)

    # -- teardown ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop tracked processes (terminate, wait, kill), then delete the namespaces; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            procs, self._procs = self._procs, []
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
            for proc in procs:
                self._end(proc)
        finally:
            remove_leftovers(self.tag)
            atexit.unregister(self.close)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Topology(tag={self.tag!r}, receivers={len(self.receivers)}, ipv6={self.ipv6}, mtu={self.mtu})"
