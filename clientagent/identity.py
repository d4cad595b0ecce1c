"""Who this machine is: its MAC address and SMBIOS UUID, found portably.

Portable: standard library only, never raises.  The MAC comes from
``uuid.getnode()`` (a random number with the multicast bit set when the OS
reports none: then we say None).  The SMBIOS UUID comes from
``/sys/class/dmi/id/product_uuid`` on Linux when readable (usually root only,
which WinPE/PXE agents are); elsewhere it is None unless given.

The normalisers are shared with the server (client records, DP targeting), so
both sides compare identities in one canonical form: MAC ``aa:bb:cc:dd:ee:ff``,
UUID lower-case ``8-4-4-4-12``.
"""

from __future__ import annotations

import re
import sys
import uuid

_HEX12 = re.compile(r"^[0-9a-f]{12}$")
DMI_UUID = "/sys/class/dmi/id/product_uuid"


def normalize_mac(text: str) -> str:
    """'AA-BB-CC-DD-EE-FF', 'aabb.ccdd.eeff', 'aabbccddeeff' -> 'aa:bb:cc:dd:ee:ff'; ValueError if not a MAC."""
    raw = re.sub(r"[:\-.\s]", "", text.strip().lower())
    if not _HEX12.match(raw):
        raise ValueError(f"not a MAC address: {text!r} (try aa:bb:cc:dd:ee:ff)")
    return ":".join(raw[i:i + 2] for i in range(0, 12, 2))


def normalize_uuid(text: str) -> str:
    """Any spelling of a UUID ('{...}', upper case, no dashes) -> canonical lower case; ValueError if not one."""
    try:
        return str(uuid.UUID(text.strip().strip("{}")))
    except (ValueError, AttributeError):
        raise ValueError(f"not an SMBIOS UUID: {text!r} (try 4c4c4544-0042-3510-8052-b4c04f4e4b31)") from None


def local_mac() -> str | None:
    """This machine's MAC as the OS reports it, or None when it reports none (or anything fails)."""
    try:
        node = uuid.getnode()
    except Exception:
        return None
    if node >> 40 & 1:  # multicast bit: uuid made up a random node, not a real MAC
        return None
    return normalize_mac(f"{node:012x}")


def local_smbios_uuid() -> str | None:
    """The SMBIOS system UUID on Linux when readable; None elsewhere or when unknown/placeholder."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(DMI_UUID, encoding="ascii", errors="replace") as fh:
            text = fh.read(128).strip()
        value = normalize_uuid(text)
    except (OSError, ValueError):
        return None
    # Firmware placeholders identify nothing.
    if value in ("00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
                 "03000200-0400-0500-0006-000700080009"):
        return None
    return value
