"""A throw-away benchmark network in Linux network namespaces (IPv4 only), for ``bench.transport``.

Adapted from ``tests/netns.py`` (kept separate so the benchmark does not depend on the test helpers)::

    mcb-TAG-s  (sender)    10.78.0.1/24   --veth--+
    mcb-TAG-r0 (receiver)  10.78.0.10/24  --veth--+-- bridge brbTAG in mcb-TAG-sw (multicast snooping off)
    mcb-TAG-rN (receiver)  10.78.0.(10+N) --veth--+

Nothing is created in the root namespace: both ends of every veth are created directly in their
namespaces, and the bridge lives in its own switch namespace. ``close()`` ends the processes this
topology started (by PID), then any other process still inside its namespaces (only something
started in them can be there), then deletes the namespaces.

Impairments, all inside the topology's namespaces:

* loss: an nftables rule ``numgen random mod 10000 < P*100 drop`` on the receiver's prerouting hook
  (every IPv4 packet that arrives, data and control alike, as on a bad link); where nft is missing
  or fails, a classic-BPF ``cls_bpf`` tc ingress filter on the kernel's per-packet random number;
* rate cap: an htb root qdisc on the sender's veth (egress; counts whole frames);
* wire frames: UDP segmentation offload is switched off on the bridge ports that lead to the
  receivers (ethtool), so a GSO super-packet from a sender is cut into MTU-sized frames before it
  reaches a receiver, as a real NIC would do, and loss hits single datagrams, not 40-segment batches.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

PREFIX = "mcb"
SUBNET4 = "10.78.0"
MAX_RECEIVERS = 64
CMD_TIMEOUT = 30.0

# Classic BPF: A = random u32 (ancillary load SKF_AD_OFF + SKF_AD_RANDOM); A >= T ? TC_ACT_OK : TC_ACT_SHOT
_SKF_AD_RANDOM = 0xFFFFF000 + 56
_TC_ACT_OK = 0
_TC_ACT_SHOT = 2
NFT_TABLE = "mcbench"


class TopologyError(RuntimeError):
    """A command that builds or changes the topology failed."""


def cmd(argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise TopologyError(f"{' '.join(argv)!s} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cmd(["ip", *(["-n", ns] if ns else []), *args], check=check)


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cmd(["tc", "-n", ns, *args], check=check)


def _in_ns(ns: str, *argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    argv2 = ["ip", "netns", "exec", ns, *argv]
    if stdin is None:
        return cmd(argv2, check=check)
    proc = subprocess.run(argv2, capture_output=True, text=True, timeout=CMD_TIMEOUT, input=stdin)
    if check and proc.returncode != 0:
        raise TopologyError(f"{' '.join(argv2)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _sysctl(ns: str, values: dict[str, int]) -> None:
    """Set per-namespace sysctls inside ``ns`` only (written through /proc/sys as seen from that namespace)."""
    for key, value in values.items():
        path = "/proc/sys/" + key.replace(".", "/")
        _in_ns(ns, "sh", "-c", f"echo {int(value)} > {path}")


def list_netns() -> list[str]:
    out = _ip(None, "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = cmd(["ip", "netns", "pids", ns], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM the given PIDs, wait up to ``grace`` seconds, SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if pid_alive(p)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            alive = [p for p in alive if pid_alive(p)]
        if not alive:
            return


def remove_leftovers(tag: str) -> list[str]:
    """Remove what is left of the topology with this ``tag`` (and nothing else)."""
    if not tag or not tag.isalnum():
        raise ValueError(f"bad topology tag {tag!r}")
    prefix = f"{PREFIX}-{tag}-"
    mine = [ns for ns in list_netns() if ns.startswith(prefix)]
    pids = [pid for ns in mine for pid in _netns_pids(ns) if pid != os.getpid()]
    stop_pids(pids)
    for ns in sorted(mine, key=lambda n: n.endswith("-sw")):
        _ip(None, "netns", "delete", ns, check=False)
    return mine


class Topology:
    """One sender and ``receivers`` receiver namespaces on a private bridge (see the module doc)."""

    def __init__(self, receivers: int, mtu: int = 1500, *, segment_at_ports: bool = True) -> None:
        if not 1 <= receivers <= MAX_RECEIVERS:
            raise ValueError(f"receivers must be 1..{MAX_RECEIVERS}")
        if not 576 <= mtu <= 65535:
            raise ValueError(f"bad mtu {mtu}")
        self.tag = secrets.token_hex(3)
        self.mtu = mtu
        base = f"{PREFIX}-{self.tag}-"
        self.switch = base + "sw"
        self.bridge = f"brb{self.tag}"
        self.sender = base + "s"
        self.receivers = [f"{base}r{i}" for i in range(receivers)]
        self.sender_ip = f"{SUBNET4}.1"
        self.receiver_ips = [f"{SUBNET4}.{10 + i}" for i in range(receivers)]
        self._ifnames = {self.sender: f"b{self.tag}s"}
        self._ports = {self.sender: f"q{self.tag}s"}
        for i, ns in enumerate(self.receivers):
            self._ifnames[ns] = f"b{self.tag}r{i}"
            self._ports[ns] = f"q{self.tag}r{i}"
        self._procs: list[subprocess.Popen[Any]] = []
        self.loss_backend = ""
        self.segmentation = "not requested"
        self._closed = False
        atexit.register(self.close)
        try:
            self._build(segment_at_ports)
        except BaseException:
            self.close()
            raise

    @property
    def namespaces(self) -> list[str]:
        return [self.sender, *self.receivers, self.switch]

    def _build(self, segment_at_ports: bool) -> None:
        for ns in self.namespaces:
            _ip(None, "netns", "add", ns)
        for ns in self.namespaces:
            _sysctl(ns, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        _ip(self.switch, "link", "add", "name", self.bridge, "mtu", str(self.mtu), "type", "bridge",
            "mcast_snooping", "0", "stp_state", "0", "forward_delay", "0")
        _ip(self.switch, "link", "set", "dev", self.bridge, "up")
        for ns, ip4 in [(self.sender, self.sender_ip), *zip(self.receivers, self.receiver_ips, strict=True)]:
            ifname, port = self._ifnames[ns], self._ports[ns]
            _ip(ns, "link", "add", "name", ifname, "mtu", str(self.mtu), "type", "veth",
                "peer", "name", port, "mtu", str(self.mtu), "netns", self.switch)
            _ip(self.switch, "link", "set", "dev", port, "master", self.bridge)
            _ip(self.switch, "link", "set", "dev", port, "up")
            _ip(ns, "link", "set", "dev", "lo", "up")
            _ip(ns, "addr", "add", f"{ip4}/24", "brd", "+", "dev", ifname)
            _ip(ns, "link", "set", "dev", ifname, "up")
            # No default route in a namespace: multicast leaves by the veth even without IP_MULTICAST_IF.
            _ip(ns, "route", "add", "224.0.0.0/4", "dev", ifname)
        if segment_at_ports:
            self.segmentation = self._segment_at_ports()
        self._wait_ready()

    def _segment_at_ports(self) -> str:
        if shutil.which("ethtool") is None:
            return "unavailable: ethtool not installed (GSO super-packets may reach receivers whole)"
        errors = []
        for ns in self.receivers:
            res = _in_ns(self.switch, "ethtool", "-K", self._ports[ns], "tx-udp-segmentation", "off", check=False)
            if res.returncode != 0:
                errors.append(res.stderr.strip())
        return "receiver ports segment UDP GSO (tx-udp-segmentation off)" if not errors else \
            f"failed: {errors[0]}"

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        pending = [ns for ns in self.namespaces if ns != self.switch]
        while pending:
            pending = [ns for ns in pending
                       if json.loads(_ip(ns, "-j", "link", "show", "dev", self._ifnames[ns]).stdout)[0]
                       .get("operstate") != "UP"]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TopologyError(f"interfaces not ready after {timeout}s in {pending}")
            time.sleep(0.02)

    # -- queries ----------------------------------------------------------------------------------

    def ifname(self, ns: str) -> str:
        return self._ifnames[ns]

    def ip(self, ns: str) -> str:
        return self.sender_ip if ns == self.sender else self.receiver_ips[self.receivers.index(ns)]

    # -- processes --------------------------------------------------------------------------------

    def command(self, ns: str, *argv: str) -> list[str]:
        if ns not in self.namespaces:
            raise KeyError(f"{ns!r} is not a namespace of topology {self.tag}")
        return ["ip", "netns", "exec", ns, *map(str, argv)]

    def popen(self, ns: str, *argv: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns`` (``ip netns exec`` execs it: same PID); ``close()`` ends it if still running."""
        if self._closed:
            raise TopologyError(f"topology {self.tag} is closed")
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.command(ns, *argv), **kwargs)
        self._procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    @staticmethod
    def end(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
        """Terminate (then kill) one process we started, by its PID."""
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

    def udp_ports(self, ns: str) -> set[int]:
        """Local UDP ports bound in ``ns`` (for waiting until a receiver listens)."""
        out = _in_ns(ns, "ss", "-Hlun", check=False).stdout
        ports = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit():
                ports.add(int(fields[3].rpartition(":")[2]))
        return ports

    def tcp_listening(self, ns: str, port: int) -> bool:
        out = _in_ns(ns, "ss", "-Hltn", check=False).stdout
        return any(line.split()[3].endswith(f":{port}") for line in out.splitlines() if len(line.split()) >= 4)

    # -- impairments ------------------------------------------------------------------------------

    def set_loss(self, ns: str, percent: float) -> str:
        """Drop ``percent`` % of the IPv4 packets arriving in ``ns``, at random; returns the backend used."""
        self.clear_loss(ns)
        if percent <= 0:
            return "none"
        if not 0 < percent < 100:
            raise ValueError("percent must be within 0..100")
        errors = []
        if shutil.which("nft"):
            threshold = round(percent * 100)
            ruleset = (f"table ip {NFT_TABLE} {{\n chain pre {{\n  type filter hook prerouting priority -300;"
                       f" policy accept;\n  numgen random mod 10000 < {threshold} counter drop\n }}\n}}\n")
            res = _in_ns(ns, "nft", "-f", "-", stdin=ruleset, check=False)
            if res.returncode == 0:
                return "nft"
            errors.append(f"nft: {res.stderr.strip()}")
        else:
            errors.append("nft not installed")
        dev = self.ifname(ns)
        threshold = min(round(percent / 100 * 2**32), 2**32 - 1)
        code = f"4,32 0 0 {_SKF_AD_RANDOM},53 0 1 {threshold},6 0 0 {_TC_ACT_OK},6 0 0 {_TC_ACT_SHOT}"
        res1 = _tc(ns, "qdisc", "add", "dev", dev, "ingress", check=False)
        res2 = _tc(ns, "filter", "add", "dev", dev, "ingress", "prio", "1", "protocol", "all", "bpf", "da",
                   "bytecode", code, check=False)
        if res1.returncode == 0 and res2.returncode == 0:
            return "tc-bpf"
        errors.append(f"tc bpf: {(res1.stderr + res2.stderr).strip()}")
        raise TopologyError("no way to inject loss here: " + " | ".join(errors))

    def clear_loss(self, ns: str) -> None:
        if shutil.which("nft"):
            _in_ns(ns, "nft", "delete", "table", "ip", NFT_TABLE, check=False)
        _tc(ns, "qdisc", "del", "dev", self.ifname(ns), "ingress", check=False)

    def loss_drops(self, ns: str) -> int | None:
        """Packets dropped by the nft loss rule in ``ns`` so far (None when not using nft)."""
        res = _in_ns(ns, "nft", "-j", "list", "table", "ip", NFT_TABLE, check=False) if shutil.which("nft") else None
        if res is None or res.returncode != 0:
            return None
        with contextlib.suppress(ValueError, KeyError, TypeError):
            for item in json.loads(res.stdout).get("nftables", []):
                rule = item.get("rule")
                if rule:
                    for expr in rule.get("expr", []):
                        if "counter" in expr:
                            return int(expr["counter"]["packets"])
        return None

    def set_rate(self, ns: str, mbit: float) -> None:
        """Cap what leaves ``ns`` through its veth at ``mbit`` Mbit/s (htb, whole frames)."""
        if mbit <= 0:
            raise ValueError("mbit must be positive")
        dev = self.ifname(ns)
        rate = f"{max(1, round(mbit * 1000))}kbit"
        quantum = str(max(1600, self.mtu + 100))
        self.clear_rate(ns)
        _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        _tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate, "ceil", rate,
            "quantum", quantum)

    def clear_rate(self, ns: str) -> None:
        _tc(ns, "qdisc", "del", "dev", self.ifname(ns), "root", check=False)

    # -- teardown ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the processes started here (by PID), then delete the namespaces; idempotent."""
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
                self.end(proc)
        finally:
            remove_leftovers(self.tag)
            atexit.unregister(self.close)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
