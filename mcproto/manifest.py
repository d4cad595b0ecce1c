"""The signed image manifest: what an image must be, chunk by chunk, signed by the controller.

Pure: no I/O beyond what callers hand in (bytes); importable on the client.
Why: even a client that holds the session key (an enrolled but malicious
machine) must not be able to make others commit forged data.  The
controller signs, once per image, the size, the whole-image SHA-256 and a
digest of every fixed-size chunk with its Ed25519 key; a client checks the
signature against the controller's public key pinned in its configuration
or boot media, then checks every chunk before committing it.

Chunks are independent of the transport's block layout (symbol size, k), so
one manifest serves every DP and MTU.  Chunk digests are SHA-256 truncated to
16 bytes: finding a second chunk with a given digest costs ~2^128 work.

Wire form: msgpack ``{"manifest": <msgpack of the fields>, "sig": <64 bytes>}``;
the signature covers the inner bytes exactly as sent (no re-encoding).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Annotated, Literal

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mcproto.errors import McdeployError

CHUNK_SIZE = 1024 * 1024
DIGEST_LEN = 16
MAX_CHUNKS = 65536  # chunks grow past 1 MiB for images over 64 GiB, so a manifest stays ~1 MiB
MAX_MANIFEST_BYTES = MAX_CHUNKS * DIGEST_LEN + 4096


class ManifestError(McdeployError):
    """A manifest is malformed, unsigned by the pinned key, or does not match the data."""


class Manifest(BaseModel):
    """The signed facts about one image."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["manifest"] = "manifest"
    version: Literal[1] = 1
    image: Annotated[str, Field(min_length=1, max_length=128)]
    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    chunk_size: Annotated[int, Field(ge=4096, le=1 << 40)] = CHUNK_SIZE
    chunk_digests: bytes  # DIGEST_LEN bytes per chunk, in order
    key_id: Annotated[str, Field(max_length=80)] = ""

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_digest(self, index: int) -> bytes:
        return self.chunk_digests[index * DIGEST_LEN:(index + 1) * DIGEST_LEN]

    def check_chunk(self, index: int, data: bytes | memoryview) -> bool:
        """Whether ``data`` is chunk ``index`` of the image (the last chunk may be short)."""
        if not 0 <= index < self.chunks:
            return False
        expected = min(self.chunk_size, self.size - index * self.chunk_size)
        return len(data) == expected and chunk_digest(data) == self.chunk_digest(index)


def chunk_size_for(size: int) -> int:
    """The chunk size for an image of ``size`` bytes: 1 MiB, doubled until at most ``MAX_CHUNKS`` chunks.

    Why: the manifest travels in every session job and to every client over the session
    plane, so it must stay small (≤ ~1 MiB) for any image, while 1 MiB chunks keep a client's
    unverified hold (a pipe output holds one chunk) small for ordinary images.
    """
    chunk = CHUNK_SIZE
    while -(-size // chunk) > MAX_CHUNKS:
        chunk *= 2
    return chunk


def chunk_digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()[:DIGEST_LEN]


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, printable fingerprint of a public key (what operators pin and compare)."""
    return "ed25519:" + hashlib.sha256(public_bytes(public_key)).hexdigest()[:32]


def public_bytes(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public_key(raw: bytes | str) -> Ed25519PublicKey:
    """A pinned controller key: 32 raw bytes, or 64 hex characters."""
    try:
        data = bytes.fromhex(raw) if isinstance(raw, str) else raw
        return Ed25519PublicKey.from_public_bytes(data)
    except ValueError as exc:
        raise ManifestError(f"not an Ed25519 public key: {exc}") from None


def build(image: str, chunks: Iterable[bytes], chunk_size: int = CHUNK_SIZE) -> Manifest:
    """Digest an image given as consecutive chunks of ``chunk_size`` bytes (the last may be short)."""
    whole = hashlib.sha256()
    digests = bytearray()
    size = 0
    short_seen = False
    for data in chunks:
        if short_seen or len(data) > chunk_size or not data:
            raise ManifestError("chunks must be full-sized except the last")
        short_seen = len(data) < chunk_size
        whole.update(data)
        digests += chunk_digest(data)
        size += len(data)
    return Manifest(image=image, size=size, sha256=whole.hexdigest(), chunk_size=chunk_size,
                    chunk_digests=bytes(digests))


def sign(manifest: Manifest, key: Ed25519PrivateKey) -> bytes:
    """The signed wire form; stamps the signer's key id into the manifest."""
    stamped = manifest.model_copy(update={"key_id": key_id(key.public_key())})
    body = msgpack.packb(stamped.model_dump(), use_bin_type=True)
    return msgpack.packb({"manifest": body, "sig": key.sign(body)}, use_bin_type=True)


def verify(blob: bytes, public_key: Ed25519PublicKey) -> Manifest:
    """Check the signature against the pinned key, then parse; raises :class:`ManifestError`."""
    if len(blob) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest too large")
    try:
        outer = msgpack.unpackb(blob, raw=False, strict_map_key=True)
        body, sig = outer["manifest"], outer["sig"]
        if set(outer) != {"manifest", "sig"} or not isinstance(body, bytes) or not isinstance(sig, bytes):
            raise ValueError
    except (ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise ManifestError("malformed manifest") from None
    try:
        public_key.verify(sig, body)
    except InvalidSignature:
        raise ManifestError("manifest signature does not verify with the pinned controller key") from None
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
        manifest = Manifest.model_validate(fields)
    except (ValueError, TypeError, ValidationError, msgpack.ExtraData, msgpack.FormatError):
        raise ManifestError("signed manifest has invalid fields") from None
    if len(manifest.chunk_digests) != manifest.chunks * DIGEST_LEN:
        raise ManifestError("manifest digests do not cover the image")
    return manifest


def build_file(image: str, path: str, chunk_size: int | None = None) -> Manifest:
    """Digest a file (see :func:`build`); the chunk size follows its size unless given.  Raises OSError."""
    import os

    size = os.path.getsize(path)
    chunk = chunk_size or chunk_size_for(size)

    def chunks() -> Iterable[bytes]:
        with open(path, "rb") as fh:
            while data := fh.read(chunk):
                yield data

    return build(image, chunks(), chunk)
