"""Portable sockets for the client: the unicast session socket and the multicast data socket.

Portable: only calls that exist on Windows and Linux.  On Linux the data
socket binds the group address (so it sees only that group's traffic); on
Windows binding a multicast address is not allowed, so it binds the wildcard
address and relies on the packet header's session id to ignore strangers.
"""

from __future__ import annotations

import contextlib
import socket
import sys

from clientagent.platform import bind_group_address

RCVBUF = 4 * 1024 * 1024


def parse_hostport(text: str, default_port: int = 47100) -> tuple[str, int]:
    """'host:port', '[v6]:port' or 'host' -> (host, port)."""
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = int(p)
    if not host or not 0 < port < 65536:
        raise ValueError(f"not a HOST:PORT: {text!r}")
    return host, port


def open_control_socket(dp: tuple[str, int]) -> tuple[socket.socket, tuple]:
    """A UDP socket for talking to the DP, and the DP's resolved address."""
    infos = socket.getaddrinfo(dp[0], dp[1], type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock, addr


def open_data_socket(group: str, port: int, interface: str = "0.0.0.0") -> socket.socket:
    """Join ``group`` on ``interface`` and return a non-blocking socket receiving its packets."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT") and sys.platform != "win32":
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((group if bind_group_address() else "", port))
    mreq = socket.inet_aton(group) + socket.inet_aton(interface)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setblocking(False)
    return sock


def interface_towards(host: str) -> str:
    """The local IPv4 address the kernel would use to reach ``host`` (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, 9))
        return probe.getsockname()[0]
    except OSError:
        return "0.0.0.0"
    finally:
        probe.close()
