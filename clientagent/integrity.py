"""The client's side of the signed manifest: fetch it from the DP, check it, decide what to trust.

Portable (sockets + selectors).  The manifest (:mod:`mcproto.manifest`) is signed
by the controller at ``mcdeploy image add``; with the controller's public key
pinned (``--controller-key``, from the boot media) a client checks every chunk
of the image against it before committing, so neither a stranger nor an
enrolled client holding the session key nor a DP can make it write forged data.

Without a pinned key a served manifest is still used for per-chunk checks (it
catches damage early and lets a bad chunk be received again rather than failing
the whole image at the final digest), but it vouches only for what the DP
says, and the result says ``unverified``.
"""

from __future__ import annotations

import selectors
import time
from dataclasses import dataclass

import msgpack
from pydantic import ValidationError

from clientagent.journal import Committer
from clientagent.output import ChunkRejected, FileOutput, PipeOutput
from mcproto import codec
from mcproto import manifest as mf
from mcproto.chunks import ChunkMap
from mcproto.errors import MessageError
from mcproto.messages import MANIFEST_PART_BYTES, ManifestGet, ManifestPart, Offer

WINDOW = 32  # parts asked for at once
RETRY_S = 0.3


class IntegrityError(Exception):
    """The session's manifest is missing, unreadable or not signed by the pinned controller key."""


@dataclass(frozen=True)
class Trust:
    """What the client checks the image against: ``manifest`` None means the final SHA-256 only."""

    manifest: mf.Manifest | None
    status: str  # "signed" (pinned key verified), "unverified" (served by the DP, no key pinned), "none"


def settle(offer: Offer, blob: bytes | None, controller_key: str | None) -> Trust:
    """Decide what to trust for ``offer`` given the fetched manifest ``blob`` (None if none is served)."""
    if blob is None:
        if controller_key:
            raise IntegrityError("the session offers no signed manifest, but a controller key is pinned "
                                 "(--controller-key): refusing an image nobody vouches for")
        return Trust(None, "none")
    if controller_key:
        manifest = mf.verify(blob, mf.load_public_key(controller_key))
        status = "signed"
    else:
        manifest = parse_unverified(blob)
        status = "unverified"
    if manifest.size != offer.image_size or manifest.sha256 != offer.image_sha256:
        raise IntegrityError("the manifest is for another image than the one offered")
    return Trust(manifest, status)


def parse_unverified(blob: bytes) -> mf.Manifest:
    """The manifest's fields without checking its signature (no key to check it with)."""
    try:
        outer = msgpack.unpackb(blob, raw=False, strict_map_key=True)
        manifest = mf.Manifest.model_validate(msgpack.unpackb(outer["manifest"], raw=False, strict_map_key=True))
    except (ValueError, TypeError, KeyError, ValidationError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError):
        raise IntegrityError("the DP served a malformed manifest") from None
    if len(manifest.chunk_digests) != manifest.chunks * mf.DIGEST_LEN:
        raise IntegrityError("the DP served a manifest whose digests do not cover the image")
    return manifest


def fetch(sock, dp_addr, offer: Offer, client_id: str, wait_s: float) -> bytes:  # type: ignore[no-untyped-def]
    """The ``offer.manifest_bytes`` bytes of the session's manifest, asked for in parts, ``WINDOW`` at a time.

    Bounded by ``wait_s``; parts that do not arrive are asked for again.  Raises :class:`IntegrityError`.
    """
    total = offer.manifest_bytes
    offsets = list(range(0, total, MANIFEST_PART_BYTES))
    parts: dict[int, bytes] = {}
    asked: dict[int, float] = {}
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + wait_s
    try:
        while len(parts) < len(offsets):
            now = time.monotonic()
            if now > deadline:
                raise IntegrityError(f"the DP did not send the session's manifest within {wait_s:g} s "
                                     f"({len(parts)} of {len(offsets)} parts)")
            due = [o for o in offsets if o not in parts and now - asked.get(o, -RETRY_S) >= RETRY_S]
            for o in due[:WINDOW - sum(1 for o in asked if o not in parts and now - asked[o] < RETRY_S)]:
                try:
                    sock.sendto(codec.encode(ManifestGet(session_id=offer.session_id, client_id=client_id,
                                                         offset=o)), dp_addr)
                except OSError as exc:
                    raise IntegrityError(f"cannot ask the DP for the manifest: {exc}") from None
                asked[o] = now
            if not sel.select(0.05):
                continue
            for _ in range(256):
                try:
                    data, addr = sock.recvfrom(4096)
                except (BlockingIOError, InterruptedError, OSError):
                    break
                if addr[:2] != dp_addr[:2]:
                    continue
                try:
                    msg = codec.decode(data, allowed=(ManifestPart,))
                except MessageError:
                    continue
                expected = min(MANIFEST_PART_BYTES, total - msg.offset)
                if (msg.session_id == offer.session_id and msg.total == total and msg.offset in asked
                        and len(msg.data) == expected):
                    parts[msg.offset] = msg.data
    finally:
        sel.close()
    return b"".join(parts[o] for o in offsets)


MAX_CHUNK_FAILURES = 3


class CheckedWriter:
    """Puts completed blocks into the output; with a manifest, commits a block only after its chunks check.

    File or device: a block's bytes are written at once (never over an already verified chunk);
    when a chunk is complete it is read back and checked, and the blocks it vouches for go to
    the journal's committer.  Pipe: the output itself holds each chunk until it checks.  A
    chunk that fails gives its blocks back to be received again (:meth:`write` returns them);
    the same chunk failing ``MAX_CHUNK_FAILURES`` times means someone keeps injecting data
    that authenticates, and the receive fails (:class:`IntegrityError`).
    """

    def __init__(self, output: FileOutput | PipeOutput, committer: Committer | None, manifest: mf.Manifest | None,
                 block_bytes: int, blocks: int, done: set[int]) -> None:
        self.output = output
        self.committer = committer
        self.manifest = manifest
        self.block_bytes = block_bytes
        self.blocks = blocks
        self.checked_chunks = 0
        self.rejected_chunks = 0
        self._failures: dict[int, int] = {}
        self.chunkmap: ChunkMap | None = None
        if manifest is not None and isinstance(output, FileOutput):
            self.chunkmap = ChunkMap(manifest.size, manifest.chunk_size, block_bytes, blocks, done)

    def write(self, offset: int, data: bytes, now: float) -> list[int]:
        """Write the block at ``offset``; returns blocks to receive again (empty normally)."""
        block = offset // self.block_bytes
        cm, manifest = self.chunkmap, self.manifest
        if manifest is None or cm is None:
            try:
                self.output.write_at(offset, data)
            except ChunkRejected as bad:  # a pipe with a manifest
                self._failed(bad.chunk)
                last = min(self.blocks, -(-bad.end // self.block_bytes))
                return list(range(bad.start // self.block_bytes, last))
            if manifest is not None:
                self.checked_chunks = getattr(self.output, "checked_chunks", 0)
            if self.committer is not None:
                self.committer.add(block, now)
            return []
        assert isinstance(self.output, FileOutput)
        view = memoryview(data)
        for at, n in cm.writable_spans(block):
            self.output.write_at(at, view[at - offset:at - offset + n])
        again: list[int] = []
        for chunk in cm.written(block):
            start, length = cm.chunk_range(chunk)
            if manifest.check_chunk(chunk, self.output.read_at(start, length)):
                self.checked_chunks += 1
                for b in cm.verified(chunk):
                    if self.committer is not None:
                        self.committer.add(b, now)
            else:
                self._failed(chunk)
                again += cm.rejected(chunk)
        return again

    def _failed(self, chunk: int) -> None:
        self.rejected_chunks += 1
        n = self._failures[chunk] = self._failures.get(chunk, 0) + 1
        if n >= MAX_CHUNK_FAILURES:
            raise IntegrityError(f"chunk {chunk} of the image failed the signed manifest {n} times: data that "
                                 "authenticates is being forged into this session (an enrolled client or the DP)")
