"""A DP's identity key: Ed25519, created on first start, kept in a 0600 file.

Server side only.  Clients pin its fingerprint (``mcdeploy dp list`` shows it); the DP signs
every offer with it, so a client knows the session key came from the DP it trusts.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from mcproto.errors import ConfigError


def default_key_path(dp_name: str) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mcdeploy" / f"dp-{dp_name}.key"


def load_or_create(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The identity in ``path``; a new one is created (mode 0600) if the file does not exist."""
    p = Path(path)
    try:
        if p.exists():
            key = load_pem_private_key(p.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"{p} is not an Ed25519 private key")
            return key
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        return key
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot use the DP identity key {p}: {exc}") from None
