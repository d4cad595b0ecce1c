"""Portable sockets for the client: the unicast session socket and the multicast data socket, IPv4 and IPv6.

Portable: only calls that exist on Windows and Linux, nothing Linux-only is
imported.  On Linux the data socket binds the group address (so it sees only
that group's traffic); on Windows binding a multicast address is not allowed,
so it binds the wildcard address and relies on the packet header's session id
to ignore strangers.

IPv6 joins name the interface by *index*.  :func:`interface_index` finds it
from an interface name (``socket.if_nametoindex``), a numeric index, a
link-local address with a scope (``fe80::1%eth0``, whose scope is the index),
or a plain address.  A plain address is matched against the kernel's address
table where the platform shows one as a file (``/proc/net/if_inet6`` on
Linux, read at run time, no import); elsewhere (Windows/WinPE) there is no
standard-library way to map an address to its interface, so the fallback is
index 0: the kernel joins on the interface its routing table picks for the
group, which is right on the usual single-homed client.  Give the interface
name or numeric index to pin it on a multi-homed machine.  The DP agent reuses
these helpers (it runs on Linux, where an address always resolves).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import sys

from clientagent.platform import bind_group_address

RCVBUF = 4 * 1024 * 1024
IF_INET6 = "/proc/net/if_inet6"  # Linux: "<32 hex digits> <ifindex hex> <prefix> <scope> <flags> <name>"


def parse_hostport(text: str, default_port: int = 47100) -> tuple[str, int]:
    """'host:port', '[v6]:port', 'v6' or 'host' -> (host, port)."""
    host, port = text, default_port
    try:
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
            elif rest:
                raise ValueError
        elif text.count(":") == 1:
            host, p = text.split(":")
            port = int(p)
    except ValueError:
        raise ValueError(f"not a HOST:PORT: {text!r}") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"not a HOST:PORT: {text!r}")
    return host, port


def is_ipv6(address: str) -> bool:
    """True for an IPv6 literal (with or without a %scope); names and IPv4 addresses are False."""
    return ":" in address


def is_multicast(address: str) -> bool:
    """True for an IPv4 or IPv6 multicast group address (an IPv6 %scope is allowed)."""
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_multicast
    except ValueError:
        return False


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport` (brackets around IPv6 literals)."""
    return f"[{host}]:{port}" if is_ipv6(host) else f"{host}:{port}"


def _index_by_address(address: str) -> int | None:
    """The index of the interface holding IPv6 ``address``, from the kernel's table if readable."""
    try:
        want = ipaddress.IPv6Address(address).packed.hex()
    except ValueError:
        return None
    try:
        with open(IF_INET6) as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 2 and fields[0].lower() == want:
                    return int(fields[1], 16)
    except OSError:  # not Linux (or /proc not mounted): no table to read
        return None
    return None


def interface_index(interface: str | None) -> int:
    """The IPv6 interface index for a name, numeric index or address; 0 = "let the kernel choose".

    Raises ValueError for a name that does not exist.  An address whose interface cannot be
    determined on this platform gives 0 (see the module docstring for why that is the fallback).
    """
    if not interface or interface in ("::", "0.0.0.0", "*"):
        return 0
    if interface.isdigit():
        return int(interface)
    if "%" in interface:
        scope = interface.rpartition("%")[2]
        if scope.isdigit():
            return int(scope)
        return interface_index(scope)
    if is_ipv6(interface):
        return _index_by_address(interface) or 0
    try:
        ipaddress.IPv4Address(interface)
        return 0  # an IPv4 address says nothing about an IPv6 interface index here
    except ValueError:
        pass
    try:
        return socket.if_nametoindex(interface)
    except (OSError, AttributeError):
        raise ValueError(f"no network interface named {interface!r}") from None


def _needs_scope(group: str) -> bool:
    """Whether an IPv6 multicast group is interface-local or link-local (ff01::/16, ff02::/16, ...)."""
    try:
        addr = ipaddress.IPv6Address(group)
    except ValueError:
        return False
    return addr.is_multicast and (addr.packed[1] & 0x0F) in (1, 2)


def open_control_socket(dp: tuple[str, int]) -> tuple[socket.socket, tuple]:
    """A UDP socket for talking to the DP, and the DP's resolved address (IPv4 or IPv6)."""
    infos = socket.getaddrinfo(dp[0], dp[1], type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock, addr


def _reusable(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT") and sys.platform != "win32":
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    return sock


def open_data_socket(group: str, port: int, interface: str | None = "0.0.0.0") -> socket.socket:
    """Join ``group`` (IPv4 or IPv6, chosen from the address) on ``interface``; a non-blocking receive socket.

    IPv4: ``interface`` is the local address to join on ("0.0.0.0": the kernel's choice).  IPv6:
    an interface name, numeric index or address (see :func:`interface_index`).
    """
    if is_ipv6(group):
        ifindex = interface_index(interface)
        sock = _reusable(socket.AF_INET6)
        try:
            if bind_group_address():
                # Linux refuses to bind an interface- or link-local-scope group without its interface.
                sock.bind((group, port, 0, ifindex if _needs_scope(group) else 0))
            else:
                sock.bind(("::", port))
            mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        except BaseException:
            sock.close()
            raise
    else:
        local = interface if interface and not is_ipv6(interface) else "0.0.0.0"
        try:
            local_packed = socket.inet_aton(local)
        except OSError:
            raise ValueError(f"for an IPv4 group the interface must be an IPv4 address, not {interface!r}") from None
        sock = _reusable(socket.AF_INET)
        try:
            sock.bind((group if bind_group_address() else "", port))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + local_packed)
        except BaseException:
            sock.close()
            raise
    sock.setblocking(False)
    return sock


def interface_towards(host: str) -> str:
    """The local address the kernel would use to reach ``host`` (no packet is sent).

    IPv6 results carry the scope (``fe80::5%3``) when the path is link-local, so
    :func:`interface_index` can find the interface.  Unknown: the wildcard of the family.
    """
    wildcard = "::" if is_ipv6(host) else "0.0.0.0"
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    except OSError:
        return wildcard
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect(addr)
        local = probe.getsockname()
    except OSError:
        return wildcard
    finally:
        probe.close()
    if family == socket.AF_INET6 and len(local) >= 4 and local[3] and "%" not in local[0]:
        return f"{local[0]}%{local[3]}"
    return str(local[0])


def host_of(addr: tuple) -> str:
    """A host string for a socket address from ``recvfrom``, keeping an IPv6 scope (``fe80::1%4``)."""
    host = str(addr[0])
    if len(addr) >= 4 and addr[3] and "%" not in host:
        return f"{host}%{addr[3]}"
    return host

