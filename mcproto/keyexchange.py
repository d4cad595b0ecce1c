"""Handing a session key to one client: X25519 to the client's ephemeral key, signed by the DP's identity.

Pure: computation only.  Why: the session key must reach only the clients a deployment targets,
and a client must know the offer came from the DP it trusts.  The client sends a fresh X25519
public key with its join; the DP wraps the session key to it (ephemeral-static X25519, HKDF,
ChaCha20-Poly1305, bound to session and client id) and signs the whole offer with its Ed25519
identity key, whose fingerprint the client pins (configuration or boot media).
"""

from __future__ import annotations

import hashlib
import struct

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mcproto.errors import McdeployError
from mcproto.messages import Offer


class KeyExchangeError(McdeployError):
    """An offer's key material or signature does not check out."""


def raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(identity: Ed25519PublicKey) -> str:
    """What operators pin: the SHA-256 of the DP's raw public key, 64 hex digits."""
    return hashlib.sha256(raw_public(identity)).hexdigest()


def _context(session_id: int, client_id: str) -> bytes:
    return b"mcdeploy session key v1" + struct.pack("!Q", session_id) + client_id.encode()


def _kek(shared: bytes, context: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared))


def wrap(session_key: bytes, client_key_hex: str, session_id: int, client_id: str) -> tuple[str, str]:
    """(ephemeral public key, wrapped key), both hex, for one client; a fresh ephemeral key per wrap."""
    try:
        client = X25519PublicKey.from_public_bytes(bytes.fromhex(client_key_hex))
    except ValueError:
        raise KeyExchangeError("the client's key is not an X25519 public key") from None
    eph = X25519PrivateKey.generate()
    ctx = _context(session_id, client_id)
    box = _kek(eph.exchange(client), ctx).encrypt(bytes(12), session_key, ctx)  # one-time key: zero nonce is safe
    return raw_public(eph.public_key()).hex(), box.hex()


def unwrap(client: X25519PrivateKey, eph_hex: str, box_hex: str, session_id: int, client_id: str) -> bytes:
    try:
        eph = X25519PublicKey.from_public_bytes(bytes.fromhex(eph_hex))
        ctx = _context(session_id, client_id)
        return _kek(client.exchange(eph), ctx).decrypt(bytes(12), bytes.fromhex(box_hex), ctx)
    except (ValueError, InvalidTag):
        raise KeyExchangeError("the offered session key cannot be unwrapped with our key") from None


def _signed_bytes(offer: Offer) -> bytes:
    return msgpack.packb(offer.model_dump(mode="json", exclude={"signature"}), use_bin_type=True)


def sign_offer(offer: Offer, identity: Ed25519PrivateKey) -> Offer:
    signed = offer.model_copy(update={"dp_key": raw_public(identity.public_key()).hex()})
    return signed.model_copy(update={"signature": identity.sign(_signed_bytes(signed)).hex()})


def check_offer(offer: Offer, pinned_fingerprint: str | None) -> None:
    """The offer is signed by its ``dp_key`` and, when pinned, that key is the pinned one."""
    if not offer.dp_key or not offer.signature:
        raise KeyExchangeError("the offer is not signed by the DP")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(offer.dp_key))
        key.verify(bytes.fromhex(offer.signature), _signed_bytes(offer))
    except (ValueError, InvalidSignature):
        raise KeyExchangeError("the offer's signature does not verify") from None
    if pinned_fingerprint and fingerprint(key) != pinned_fingerprint.lower().removeprefix("sha256:"):
        raise KeyExchangeError("the DP's identity is not the pinned one (--dp-key): refusing its offer")
