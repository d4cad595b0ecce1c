"""Ed25519 identity keys of the site's servers, created on first use, kept in 0600 files.

Server side only.  A DP signs every offer with its key; clients pin its fingerprint
(``mcdeploy dp list`` shows it), so they know the session key came from the DP they trust.
The controller signs every image manifest with its key; clients pin its public key
(``mcdeploy key`` shows it), so no DP or client can make them commit forged data.
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


def _data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")) / "mcdeploy"


def default_spool_dir(dp_name: str) -> Path:
    return _data_dir() / f"spool-{dp_name}"


def default_key_path(dp_name: str) -> Path:
    return _data_dir() / f"dp-{dp_name}.key"


def controller_key(key_file: str = "") -> Ed25519PrivateKey:
    """The controller's signing key: ``key_file``, else ``$XDG_DATA_HOME/mcdeploy/controller.key``."""
    return load_or_create(key_file or _data_dir() / "controller.key")


def load_or_create(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The identity in ``path``; a new one is created (mode 0600) if the file does not exist.

    Creation is atomic (written to a temporary name, then linked into place), so two
    processes starting together (a controller CLI and its worker) end up with one key.
    """
    p = Path(path)
    try:
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = Ed25519PrivateKey.generate()
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(tmp, p)
                    return key
                except FileExistsError:
                    pass  # another process won: use its key
            finally:
                tmp.unlink(missing_ok=True)
        key = load_pem_private_key(p.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{p} is not an Ed25519 private key")
        return key
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot use the identity key {p}: {exc}") from None
