"""Run-time choice between Linux fast paths and the portable fallback.

Portable.  The client must run in WinPE as well as on Linux, so nothing
Linux-only is imported; fast paths are chosen here at run time.  Setting
``MCDEPLOY_CLIENT_PORTABLE=1`` forces the portable path everywhere, which
is how the tests prove the fallback works on a Linux machine.
"""

from __future__ import annotations

import os
import sys


def portable_forced() -> bool:
    return os.environ.get("MCDEPLOY_CLIENT_PORTABLE", "") == "1"


def use_pwrite() -> bool:
    """Positional writes without a seek (Linux/BSD); seek + write elsewhere."""
    return hasattr(os, "pwrite") and not portable_forced()


def bind_group_address() -> bool:
    """Bind the data socket to the group (Linux filters by group); Windows cannot bind a group."""
    return sys.platform.startswith("linux") and not portable_forced()

